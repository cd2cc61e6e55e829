"""Output parsers (reasoning, tool calls), one small registered class each."""

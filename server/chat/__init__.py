"""The internal chat request and what every API shares: prompts, tools, constraints,
parsing seams."""

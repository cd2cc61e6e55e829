"""Output parsers (reasoning, tool calls), one small registered class each.

    registry.py     the formats (hermes JSON, Qwen XML, Mistral) and their detection
    base.py         streaming machinery shared by the tool-call parsers
    reasoning.py    <think>...</think> -> reasoning_content
    choice.py       one choice's parser: reasoning, then tool calls
"""

from .base import ToolCallParser, assemble_calls
from .choice import ChoiceParser
from .reasoning import ReasoningParser, opened_in_prompt
from .registry import CHOICES, FORMATS, ToolFormat, detect_format, format_named, resolve_format

__all__ = [
    "CHOICES",
    "FORMATS",
    "ChoiceParser",
    "ReasoningParser",
    "ToolCallParser",
    "ToolFormat",
    "assemble_calls",
    "detect_format",
    "format_named",
    "opened_in_prompt",
    "resolve_format",
]

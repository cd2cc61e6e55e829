"""The tool-call formats we read and write, and how a model's format is recognised.

The chat template decides: it is what taught the model its format (and what renders past
calls back into the prompt). `--tool-call-parser NAME` overrides the guess.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import hermes_json, mistral, qwen_xml
from .base import ToolCallParser


@dataclass(frozen=True)
class ToolFormat:
    name: str
    parser: type[ToolCallParser]
    # Lark rules forcing one call: call_rules(rule, name, parameters, marker) -> lines.
    call_rules: Callable[[str, str, dict[str, Any], Any], list[str]]
    start: str  # the opening marker of a call
    end: str | None  # its closing marker (None: a call ends where its JSON ends)
    separator: str  # what the model writes between parallel calls
    summary: str


FORMATS: dict[str, ToolFormat] = {
    "hermes": ToolFormat(
        "hermes", hermes_json.HermesJsonParser, hermes_json.call_rules,
        hermes_json.START, hermes_json.END, "\n",
        'Qwen3, Qwen2.5, Hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call>',
    ),
    "qwen3_xml": ToolFormat(
        "qwen3_xml", qwen_xml.QwenXmlParser, qwen_xml.call_rules,
        qwen_xml.START, qwen_xml.END, "\n",
        "Qwen3.5, Qwen3-Coder: <tool_call><function=NAME><parameter=ARG>value</parameter>...",
    ),
    "mistral": ToolFormat(
        "mistral", mistral.MistralParser, mistral.call_rules, mistral.START, None, "",
        "Mistral: [TOOL_CALLS]name[ARGS]{...} or [TOOL_CALLS][{...}, ...]",
    ),
}

ALIASES = {
    "qwen3": "hermes", "qwen2.5": "hermes", "json": "hermes",
    "qwen3.5": "qwen3_xml", "qwen3_coder": "qwen3_xml", "xml": "qwen3_xml",
}

CHOICES = ("auto", "none", *FORMATS, *ALIASES)


def format_named(name: str) -> ToolFormat:
    key = ALIASES.get(name, name)
    if key not in FORMATS:
        raise ValueError(f"unknown tool-call parser '{name}'; choose one of: "
                         f"{', '.join(CHOICES)}")
    return FORMATS[key]


def detect_format(chat_template: str | Mapping[str, str] | None,
                  vocab: Mapping[str, int] | None = None) -> ToolFormat | None:
    """The format a chat template renders tool calls in; None when it shows none."""
    if isinstance(chat_template, Mapping):  # named templates ("default", "tool_use", ...)
        chat_template = "\n".join(str(t) for t in chat_template.values())
    template = chat_template or ""
    if "<function=" in template and "<parameter=" in template:
        return FORMATS["qwen3_xml"]
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if "<tool_call>" in template:
        return FORMATS["hermes"]
    if vocab is not None and "<tool_call>" in vocab and "</tool_call>" in vocab:
        return FORMATS["hermes"]  # the markers are there, the template does not say more
    return None


def resolve_format(choice: str | None, chat_template: Any,
                   vocab: Mapping[str, int] | None = None) -> ToolFormat | None:
    """--tool-call-parser: "auto"/None detects, "none" turns tool calls off, else a name."""
    if choice in (None, "auto"):
        return detect_format(chat_template, vocab)
    if choice == "none":
        return None
    return format_named(choice)

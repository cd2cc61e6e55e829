"""tool_choice "auto" and "none" as grammars: free text, and calls only of declared tools.

"auto": the answer is free text until the model opens a call; from the opening marker on,
the call must name a declared function with arguments valid for its schema (the same
per-function rules that force calls in tool_choice.py), then free text again. A model that
invents a function cannot write it: after `<tool_call>` only the declared names can come.

The opening marker is either one special token (Qwen's `<tool_call>`), which free text
cannot contain, so the grammar switches on that token; or plain text spread over several
tokens, which a lazy lexeme watches for (it ends at the first occurrence of the marker),
as llguidance's structural tags do.

"none": the opening marker may not appear at all; when it is several tokens, banning one
token would not do, so the free text is a regex that excludes the marker.
"""

from __future__ import annotations

from typing import Any

from ..parsers.registry import ToolFormat
from .tool_choice import ToolChoice, calls_rules

_TEXT = r"/(.|\n)*/"
_REGEX_META = set("\\.+*?()|[]{}^$#&-~/\"")


def _regex_literal(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def declared_calls_grammar(fmt: ToolFormat, tools: list[dict[str, Any]], parallel: bool,
                           marker: Any) -> str:
    """Lark grammar for tool_choice "auto" (see the module docstring)."""
    # "call" and one rule (plus helpers) per function, as the forced form has them.
    rules = [r for r in calls_rules(fmt, tools, ToolChoice("required"), False, marker)
             if not r.startswith("calls:")]
    opening = marker(fmt.start)
    if opening.startswith("<["):  # one special token: text cannot contain it
        # parallel_tool_calls=false: the answer ends with its one call.
        start = "TEXT (call TEXT)*" if parallel else "TEXT call?"
        return "\n".join([f"start: {start}", f"TEXT: {_TEXT}", *rules])
    # The lazy lexeme ends at the first marker; the call rules then go on after it.
    bodies = [_without_opening(r, opening) for r in rules]
    start = "(opening call)* TEXT" if parallel else "TEXT | opening call"
    return "\n".join([f"start: {start}", f"opening[lazy]: {_TEXT} {opening}",
                      f"TEXT: {_TEXT}", *bodies])


def _without_opening(rule: str, opening: str) -> str:
    name, sep, body = rule.partition(": ")
    if body.startswith(opening + " "):
        body = body[len(opening) + 1:]
    return name + sep + body


def no_calls_grammar(fmt: ToolFormat) -> str:
    """Lark grammar for tool_choice "none" when the opening marker is several tokens."""
    marker = _regex_literal(fmt.start)
    return "\n".join(["start: TEXT", rf"TEXT: /(.|\n)*/ & ~/(.|\n)*{marker}(.|\n)*/"])

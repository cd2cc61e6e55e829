"""One choice's output parser: reasoning first, then tool calls in what remains."""

from __future__ import annotations

from typing import Any

from ..chat.output import ParsedDelta
from .base import ToolCallParser
from .reasoning import ReasoningParser


class ChoiceParser:
    """Implements server.output.OutputParser: text deltas in, message parts out."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None):
        self._reasoning = reasoning
        self._tools = tools

    def feed(self, text: str) -> ParsedDelta:
        reasoning, content = self._reasoning.feed(text) if self._reasoning else ("", text)
        return self._content(reasoning, content)

    def finish(self) -> ParsedDelta:
        reasoning, content = self._reasoning.finish() if self._reasoning else ("", "")
        delta = self._content(reasoning, content)
        if self._tools is None:
            return delta
        tail = self._tools.finish()
        return ParsedDelta(delta.content + tail.content, delta.reasoning,
                           merge_fragments(delta.tool_calls, tail.tool_calls))

    def _content(self, reasoning: str, content: str) -> ParsedDelta:
        if self._tools is None:
            return ParsedDelta(content=content, reasoning=reasoning)
        parsed = self._tools.feed(content) if content else ParsedDelta()
        return ParsedDelta(parsed.content, reasoning, parsed.tool_calls)


def merge_fragments(first: list[dict[str, Any]],
                    second: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two runs of tool-call deltas as one (the arguments of the same call joined)."""
    merged = [dict(f, function=dict(f["function"])) for f in first]
    for fragment in second:
        if merged and merged[-1]["index"] == fragment["index"]:
            merged[-1]["function"]["arguments"] += fragment["function"].get("arguments", "")
        else:
            merged.append(fragment)
    return merged

"""The seam for output parsers (reasoning, tool calls): text deltas in, message parts out.

One parser object per choice sees every text delta the engine produces, in order, and the
end of the choice. The reasoning and tool-call parsers (server/parsers/) implement this
protocol; until they are plugged in, `PassThroughParser` keeps all text as content.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class ParsedDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.content or self.reasoning or self.tool_calls)


class OutputParser(Protocol):
    def feed(self, text: str) -> ParsedDelta:
        """Consumes the next piece of generated text."""
        ...

    def finish(self) -> ParsedDelta:
        """Flushes anything held back once the choice has ended."""
        ...


class PassThroughParser:
    def feed(self, text: str) -> ParsedDelta:
        return ParsedDelta(content=text)

    def finish(self) -> ParsedDelta:
        return ParsedDelta()


# Built per choice; a later issue picks a parser from the model and the request's tools.
ParserFactory = Callable[[], OutputParser]

"""What every streaming tool-call parser shares: marker search, call deltas, content rules.

A tool-call parser sees the content text of one choice (reasoning already split off) in
whatever pieces the engine produces. Outside a call, text is content, except a suffix that
could still grow into a call's opening marker, which is held back until the next piece
decides. Inside a call, a format-specific `CallReader` turns the text into events (the
function name, pieces of the arguments JSON) that become OpenAI tool-call deltas:

    {"index": 0, "id": "call_...", "type": "function", "function": {"name": "f", "arguments": ""}}
    {"index": 0, "function": {"arguments": "{\\"city\\": "}}

The output never depends on how the text was cut into pieces, so the streamed deltas
accumulate to exactly the non-streamed message.
"""

from __future__ import annotations

import enum
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..chat.output import ParsedDelta

_ID_ALPHABET = string.ascii_letters + string.digits

# How forced JSON is laid out (llguidance's x-guidance options): the models' own style
# (json.dumps separators), and no free whitespace, so the grammar decides where it ends.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def new_call_id() -> str:
    """An id shaped like OpenAI's (`call_` + 24 letters and digits)."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def find_marker(text: str, markers: Sequence[str]) -> tuple[int, str] | None:
    """The earliest marker in `text` as (position, marker); the longest wins a tie."""
    best: tuple[int, str] | None = None
    for marker in markers:
        pos = text.find(marker)
        if pos >= 0 and (best is None or pos < best[0] or
                         (pos == best[0] and len(marker) > len(best[1]))):
            best = (pos, marker)
    return best


def held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of some marker (not all of it)."""
    longest = max((len(m) for m in markers), default=0)
    for size in range(min(len(text), longest - 1), 0, -1):
        tail = text[-size:]
        if any(m.startswith(tail) for m in markers):
            return size
    return 0


class Status(enum.Enum):
    OPEN = "open"  # the call goes on; feed more text
    DONE = "done"  # the call ended well
    MALFORMED = "malformed"  # not a call after all


@dataclass
class ReadResult:
    consumed: int
    status: Status = Status.OPEN
    name: str | None = None  # set once, when the function name is known
    arguments: str = ""  # the next piece of the arguments JSON string
    # DONE, and another call follows at once with no marker (a JSON array of calls).
    follow: CallReader | None = None


class CallReader:
    """Reads the text of one call after its opening marker (one subclass per format)."""

    def read(self, text: str) -> ReadResult:
        """Consumes what it can decide of `text`; leaves the rest for a later call."""
        raise NotImplementedError

    def end(self, text: str) -> ReadResult:
        """The text ended (`text` is what `read` left): finish the call or give it up."""
        raise NotImplementedError


@dataclass
class _Output:
    content: str = ""
    fragments: list[dict[str, Any]] = field(default_factory=list)

    def add_fragment(self, fragment: dict[str, Any]) -> None:
        last = self.fragments[-1] if self.fragments else None
        if last is not None and last["index"] == fragment["index"]:
            last["function"]["arguments"] += fragment["function"]["arguments"]
        else:
            self.fragments.append(fragment)


class ToolCallParser:
    """Content text in, content and tool-call deltas out (see the module docstring)."""

    start_markers: tuple[str, ...] = ()

    def __init__(self, tools: list[dict[str, Any]] | None = None):
        self.tools = tools or []
        self._buffer = ""
        self._reader: CallReader | None = None
        self._raw = ""  # the current call's text so far, returned as content if malformed
        self._call_id: str | None = None  # set once the current call was announced
        self._calls = 0
        self._pending_space = ""  # trailing whitespace of content, held until decided
        self._after_call = False

    def new_reader(self, marker: str) -> CallReader:
        raise NotImplementedError

    def tool_schema(self, name: str) -> dict[str, Any] | None:
        """The JSON schema of the parameters of the request's tool `name`, if it has one."""
        for tool in self.tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and function.get("name") == name:
                params = function.get("parameters")
                return params if isinstance(params, dict) else None
        return None

    # ------------------------------------------------------------ OutputParser

    def feed(self, text: str) -> ParsedDelta:
        out = _Output()
        self._buffer += text
        while self._buffer:
            progressed = self._read_call(out) if self._reader else self._read_content(out)
            if not progressed:
                break
        return ParsedDelta(content=out.content, tool_calls=out.fragments)

    def finish(self) -> ParsedDelta:
        out = _Output()
        if self._reader is not None:
            result = self._reader.end(self._buffer)
            self._buffer = ""
            self._apply(result, out)
            if result.status is Status.DONE or self._call_id is not None:
                self._close_call()
            else:
                self._give_up_call(out)
        if self._buffer:  # a held start of a marker that never completed: plain text
            self._add_content(out, self._buffer)
            self._buffer = ""
        if self._calls == 0:
            out.content += self._pending_space
        self._pending_space = ""
        return ParsedDelta(content=out.content, tool_calls=out.fragments)

    # ------------------------------------------------------------ states

    def _read_content(self, out: _Output) -> bool:
        hit = find_marker(self._buffer, self.start_markers)
        if hit is None:
            keep = held_suffix(self._buffer, self.start_markers)
            self._add_content(out, self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return False
        pos, marker = hit
        self._add_content(out, self._buffer[:pos])
        self._buffer = self._buffer[pos + len(marker):]
        self._reader = self.new_reader(marker)
        self._raw = marker
        return True

    def _read_call(self, out: _Output) -> bool:
        assert self._reader is not None
        result = self._reader.read(self._buffer)
        self._raw += self._buffer[: result.consumed]
        self._buffer = self._buffer[result.consumed:]
        self._apply(result, out)
        if result.status is Status.DONE:
            self._close_call()
            if result.follow is not None:
                self._reader = result.follow
            return True
        if result.status is Status.MALFORMED:
            if self._call_id is None:
                self._give_up_call(out)
            else:  # already announced: keep what the client has seen, read on as content
                self._close_call()
            return True
        return result.consumed > 0

    def _apply(self, result: ReadResult, out: _Output) -> None:
        index = self._calls
        if result.name is not None and self._call_id is None:
            self._call_id = new_call_id()
            self._pending_space = ""  # whitespace before a call is not content
            out.add_fragment({"index": index, "id": self._call_id, "type": "function",
                              "function": {"name": result.name, "arguments": ""}})
        if result.arguments:
            assert self._call_id is not None, "arguments before the function name"
            out.add_fragment({"index": index, "function": {"arguments": result.arguments}})

    def _close_call(self) -> None:
        if self._call_id is not None:
            self._calls += 1
            self._after_call = True
        self._reader = None
        self._call_id = None
        self._raw = ""

    def _give_up_call(self, out: _Output) -> None:
        """Not a call after all: its text so far is content, and reading goes on as content."""
        raw = self._raw
        self._reader = None
        self._call_id = None
        self._raw = ""
        self._add_content(out, raw)

    def _add_content(self, out: _Output, text: str) -> None:
        if not text:
            return
        if self._after_call:  # whitespace between and after calls is layout, not content
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._pending_space + text
        kept = text.rstrip()
        self._pending_space = text[len(kept):]
        out.content += kept


def assemble_calls(fragments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed deltas -> the `message.tool_calls` of a non-streamed response."""
    calls: dict[int, dict[str, Any]] = {}
    for fragment in fragments:
        index = fragment["index"]
        if index not in calls:
            calls[index] = {"id": fragment.get("id", ""), "type": "function",
                            "function": {"name": "", "arguments": ""}}
        function = fragment.get("function", {})
        if function.get("name"):
            calls[index]["function"]["name"] = function["name"]
        calls[index]["function"]["arguments"] += function.get("arguments", "")
    return [calls[i] for i in sorted(calls)]

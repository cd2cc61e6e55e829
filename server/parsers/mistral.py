"""Mistral tool calls, both generations of the format:

    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}          (tokenizer v11+; repeats per call,
                                                             sometimes with [CALL_ID]id)
    [TOOL_CALLS][{"name": "get_weather", "arguments": {...}}, ...]     (v3: one JSON array)

Neither has a closing marker: a call ends where its JSON ends. The arguments are streamed
as they are written, as with the other formats.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .base import JSON_STYLE, CallReader, ReadResult, Status, ToolCallParser
from .hermes_json import HermesJsonReader
from .json_scan import JsonScanner

START = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_NAME = re.compile(r"[\w.\-]+")
_MAX_HEADER = 256


class MistralReader(CallReader):
    """Looks at the first character after the marker and hands over to the right reader."""

    def __init__(self) -> None:
        self._inner: CallReader | None = None

    def read(self, text: str) -> ReadResult:
        skipped = 0
        if self._inner is None:
            stripped = text.lstrip()
            if not stripped:
                return ReadResult(consumed=len(text))
            skipped = len(text) - len(stripped)
            text = stripped
            self._inner = _ArrayElementReader(first=True) if text[0] == "[" \
                else _NamedCallReader()
        result = self._inner.read(text)
        result.consumed += skipped
        return result

    def end(self, text: str) -> ReadResult:
        if self._inner is None:
            return ReadResult(consumed=len(text), status=Status.MALFORMED)
        return self._inner.end(text)


class _NamedCallReader(CallReader):
    """`name[ARGS]{...}`, possibly `name[CALL_ID]id[ARGS]{...}`."""

    def __init__(self) -> None:
        self._header_done = False
        self._args_started = False
        self._scanner = JsonScanner()

    def read(self, text: str) -> ReadResult:
        result = ReadResult(consumed=0)
        if not self._header_done:
            pos = text.find(ARGS)
            if pos < 0:
                if len(text) > _MAX_HEADER:
                    result.status = Status.MALFORMED
                return result
            name = text[:pos].split(CALL_ID)[0].strip()
            if not _NAME.fullmatch(name):
                result.status = Status.MALFORMED
                return result
            result.name = name
            self._header_done = True
            result.consumed = pos + len(ARGS)
        rest = text[result.consumed:]
        if not self._args_started:
            stripped = rest.lstrip()
            result.consumed += len(rest) - len(stripped)
            rest = stripped
            if not rest:
                return result
            if rest[0] != "{":  # the arguments must be an object
                result.status = Status.MALFORMED
                return result
            self._args_started = True
        used = self._scanner.feed(rest)
        result.arguments += rest[:used]
        result.consumed += used
        if self._scanner.error:
            result.status = Status.MALFORMED  # the name was sent: the parser keeps the call
        elif self._scanner.done:
            result.status = Status.DONE
        return result

    def end(self, text: str) -> ReadResult:
        done = self._scanner.done
        return ReadResult(consumed=len(text), status=Status.DONE if done else Status.MALFORMED)


class _ArrayElementReader(HermesJsonReader):
    """One `{"name": ..., "arguments": ...}` of the v3 array; hands over to the next one."""

    def __init__(self, first: bool):
        super().__init__()
        if first:
            self._state = "before_array"

    def _structural(self, ch: str, result: ReadResult) -> bool:
        if self._state == "before_array":
            self._state = "before_object"
            return ch == "["
        return super()._structural(ch, result)

    def _read_closing(self, text: str, i: int, result: ReadResult) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i == len(text):
            return i
        result.status = Status.DONE
        if text[i] == ",":
            result.follow = _ArrayElementReader(first=False)
            return i + 1
        return i + 1 if text[i] == "]" else i


class MistralParser(ToolCallParser):
    start_markers = (START,)

    def new_reader(self, marker: str) -> CallReader:
        return MistralReader()


def call_rules(rule: str, name: str, parameters: dict[str, Any], marker: Any) -> list[str]:
    """Lark rules forcing one call of `name` in the v11 format (see tool_choice.py)."""
    schema = {**parameters, "x-guidance": JSON_STYLE}
    body = json.dumps(schema, ensure_ascii=False)
    return [f"{rule}: {marker(START)} {json.dumps(name)} {marker(ARGS)} %json {body}"]

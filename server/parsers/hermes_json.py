"""Qwen3 / Hermes tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

The arguments object is streamed as the model writes it (each piece checked by the JSON
scanner), once the function name is known. Tolerated variants seen in the wild: a missing
`</tool_call>` at the end of the output, `"parameters"` instead of `"arguments"`, arguments
given as a JSON string that holds an object, and `"arguments"` written before `"name"`
(then the call is sent whole when the object closes).
"""

from __future__ import annotations

import json
from typing import Any

from .base import JSON_STYLE, CallReader, ReadResult, Status, ToolCallParser
from .json_scan import JsonScanner

START = "<tool_call>"
END = "</tool_call>"
_ARGUMENT_KEYS = ("arguments", "parameters")
_WHITESPACE = " \t\r\n"
_AFTER_OBJECT_NOISE = _WHITESPACE + "}]"


class HermesJsonReader(CallReader):
    def __init__(self) -> None:
        self._state = "before_object"
        self._scanner = JsonScanner()
        self._raw = ""  # the key or value being read
        self._key = ""
        self._name: str | None = None
        self._announced = False
        self._args_mode = ""  # "", "stream" (sent as read) or "buffer"
        self._args_text: str | None = None  # buffered arguments, complete, not yet sent
        self._args_sent = False

    def read(self, text: str) -> ReadResult:
        result = ReadResult(consumed=0)
        i = 0
        while i < len(text) and result.status is Status.OPEN:
            state = self._state
            if state in ("key", "value"):
                i = self._read_json(text, i, result)
                if self._state == state and result.status is Status.OPEN:
                    break  # the key or value needs more text
                continue
            if state == "after_object":
                i = self._read_closing(text, i, result)
                break
            ch = text[i]
            if ch in _WHITESPACE:
                i += 1
                continue
            i += 1
            if not self._structural(ch, result):
                result.status = Status.MALFORMED
        result.consumed = i
        return result

    def end(self, text: str) -> ReadResult:
        result = ReadResult(consumed=len(text))
        if self._state == "value" and not self._scanner.done and self._scanner.finish():
            self._value_done(result)  # a number that ends the text
        # Cut off before the object closed: the parser keeps what the client already saw.
        result.status = Status.DONE if self._state == "after_object" else Status.MALFORMED
        return result

    # ------------------------------------------------------------ object structure

    def _structural(self, ch: str, result: ReadResult) -> bool:
        state = self._state
        if state == "before_object":
            self._state = "before_key"
            return ch == "{"
        if state == "before_key":
            if ch == "}":
                return self._object_done(result)
            if ch != '"':
                return False
            self._start_json('"', "key")
            return True
        if state == "colon":
            self._state = "before_value"
            return ch == ":"
        if state == "before_value":
            self._start_json(ch, "value")
            if self._key in _ARGUMENT_KEYS and not self._args_mode:
                self._args_mode = "stream" if self._announced and ch == "{" else "buffer"
                if self._args_mode == "stream":
                    result.arguments += ch
            return not self._scanner.error
        if state == "after_value":
            if ch == ",":
                self._state = "before_key"
                return True
            return ch == "}" and self._object_done(result)
        return False

    def _start_json(self, first: str, state: str) -> None:
        self._scanner = JsonScanner()
        self._scanner.feed(first)
        self._raw = first
        self._state = state

    def _read_json(self, text: str, i: int, result: ReadResult) -> int:
        used = self._scanner.feed(text[i:])
        piece = text[i:i + used]
        self._raw += piece
        if self._state == "value" and self._key in _ARGUMENT_KEYS and self._args_mode == "stream":
            result.arguments += piece
        if self._scanner.error:
            result.status = Status.MALFORMED
        elif self._scanner.done:
            if self._state == "key":
                self._key = json.loads(self._raw)
                self._state = "colon"
            else:
                self._value_done(result)
        return i + used

    def _value_done(self, result: ReadResult) -> None:
        self._state = "after_value"
        if self._key == "name" and self._name is None:
            name = json.loads(self._raw)
            if not isinstance(name, str) or not name.strip():
                result.status = Status.MALFORMED
                return
            self._name = name.strip()
            self._announce(result)
        elif self._key in _ARGUMENT_KEYS and self._args_mode == "buffer" and not self._args_sent:
            self._args_text = _arguments_text(self._raw)
            if self._args_text is None:
                result.status = Status.MALFORMED
            elif self._announced:
                self._send_buffered(result)
        elif self._key in _ARGUMENT_KEYS and self._args_mode == "stream":
            self._args_sent = True

    def _announce(self, result: ReadResult) -> None:
        if self._announced or self._name is None:
            return
        self._announced = True
        result.name = self._name
        if self._args_text is not None:
            self._send_buffered(result)

    def _send_buffered(self, result: ReadResult) -> None:
        result.arguments += self._args_text or ""
        self._args_text = None
        self._args_sent = True

    def _object_done(self, result: ReadResult) -> bool:
        if self._name is None:
            return False
        self._announce(result)
        if not self._args_sent and self._args_mode != "stream":
            result.arguments += "{}"  # a call without arguments
            self._args_sent = True
        self._state = "after_object"
        return True

    def _read_closing(self, text: str, i: int, result: ReadResult) -> int:
        """After the object: `</tool_call>` (or the next call's opening, or other text).

        Whitespace and stray closing brackets (small models often add one `}` too many)
        before the closing tag are dropped."""
        while i < len(text) and text[i] in _AFTER_OBJECT_NOISE:
            i += 1
        rest = text[i:]
        if rest.startswith(END):
            result.status = Status.DONE
            return i + len(END)
        if rest and not (END.startswith(rest) or START.startswith(rest)):
            # The closing tag was left out: the call is complete and what follows (a new
            # call, or text) is for the parser to read.
            result.status = Status.DONE
        return i


def _arguments_text(raw: str) -> str | None:
    """A buffered arguments value as the JSON object text the client gets, or None."""
    value = json.loads(raw)
    if value is None:
        return "{}"
    if isinstance(value, str):  # arguments double-encoded as a string
        try:
            inner = json.loads(value)
        except ValueError:
            return None
        return value if isinstance(inner, dict) else None
    return raw if isinstance(value, dict) else None


class HermesJsonParser(ToolCallParser):
    start_markers = (START,)

    def new_reader(self, marker: str) -> CallReader:
        return HermesJsonReader()


def call_rules(rule: str, name: str, parameters: dict[str, Any], marker: Any) -> list[str]:
    """Lark rules forcing one call of `name` in this format (see tool_choice.py)."""
    schema = {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": JSON_STYLE,
    }
    body = json.dumps(schema, ensure_ascii=False)
    return [f'{rule}: {marker(START)} "\\n" %json {body} "\\n" {marker(END)}']

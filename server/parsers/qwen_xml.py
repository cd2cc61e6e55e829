"""Qwen3.5 / Qwen3-Coder tool calls, XML style:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Zürich
    </parameter>
    </function>
    </tool_call>

The arguments JSON is built here: each value is converted by the tool's JSON schema
(schema_values.py) and sent when its `</parameter>` arrives; values the schema declares as
plain strings are streamed as they are written. The arguments are always valid JSON, even
when the output is cut off inside a call. A `<function=...>` block without the
`<tool_call>` wrapper (Qwen3-Coder does that sometimes) is read too.
"""

from __future__ import annotations

import json
from typing import Any

from . import schema_values
from .base import JSON_STYLE, CallReader, ReadResult, Status, ToolCallParser, held_suffix

START = "<tool_call>"
END = "</tool_call>"
FUNCTION = "<function="
FUNCTION_END = "</function>"
PARAMETER = "<parameter="
PARAMETER_END = "</parameter>"
_VALUE_ENDS = ("\n" + PARAMETER_END, PARAMETER_END)
_MAX_NAME = 256  # longer than this without a ">" is not a name


class QwenXmlReader(CallReader):
    def __init__(self, parser: ToolCallParser, wrapped: bool):
        self._parser = parser
        self._wrapped = wrapped  # opened by <tool_call> (else a bare <function=)
        self._state = "before_function" if wrapped else "function_name"
        self._schema: dict[str, Any] | None = None
        self._params = 0
        self._key = ""
        self._value = ""  # the current value (not streamed ones)
        self._streaming = False  # the current value is plain text sent as it comes
        self._value_started = False

    def read(self, text: str) -> ReadResult:
        result = ReadResult(consumed=0)
        i = 0
        while result.status is Status.OPEN:
            used = self._step(text[i:], result)
            if used is None:
                break
            i += used
        result.consumed = i
        return result

    def end(self, text: str) -> ReadResult:
        # `text` is at most a held start of a closing tag or a line break: not content.
        result = ReadResult(consumed=len(text))
        if self._state in ("before_function", "function_name"):
            result.status = Status.MALFORMED
            return result
        if self._state == "value":  # cut off inside a value: keep what was written
            self._close_value(result)
        if self._state in ("in_function", "value", "parameter_name"):
            self._close_arguments(result)
        result.status = Status.DONE
        return result

    # ------------------------------------------------------------ states

    def _step(self, text: str, result: ReadResult) -> int | None:
        """Advances one step; returns characters used, or None when more text is needed."""
        state = self._state
        if state == "value":
            return self._read_value(text, result)
        stripped = text.lstrip()
        skipped = len(text) - len(stripped)
        if state == "before_function":
            return self._expect(stripped, skipped, FUNCTION, "function_name", result)
        if state in ("function_name", "parameter_name"):
            return self._read_name(text, result)
        if state == "in_function":
            if stripped.startswith(PARAMETER):
                self._state = "parameter_name"
                return skipped + len(PARAMETER)
            if stripped.startswith(FUNCTION_END):
                self._close_arguments(result)
                self._state = "after_function"
                return skipped + len(FUNCTION_END)
            if _could_become(stripped, (PARAMETER, FUNCTION_END)):
                return skipped if skipped else None
            self._close_arguments(result)  # not a parameter: the call ends here
            result.status = Status.DONE
            return skipped
        # after_function: the closing </tool_call>, unless the call had no wrapper.
        if not self._wrapped:
            result.status = Status.DONE
            return 0
        if stripped.startswith(END):
            result.status = Status.DONE
            return skipped + len(END)
        if _could_become(stripped, (END,)):
            return skipped if skipped else None
        result.status = Status.DONE  # the closing tag was left out
        return skipped

    def _expect(self, text: str, skipped: int, marker: str, then: str,
                result: ReadResult) -> int | None:
        if text.startswith(marker):
            self._state = then
            return skipped + len(marker)
        if _could_become(text, (marker,)):
            return skipped if skipped else None
        result.status = Status.MALFORMED
        return skipped

    def _read_name(self, text: str, result: ReadResult) -> int | None:
        end = text.find(">")
        name = text[:end].strip() if end >= 0 else text
        if "\n" in name or "<" in name or len(name) > _MAX_NAME or (end >= 0 and not name):
            if self._state == "function_name":
                result.status = Status.MALFORMED
            else:  # not a parameter after all: the call ends before it
                self._close_arguments(result)
                result.status = Status.DONE
            return 0
        if end < 0:
            return None
        if self._state == "function_name":
            result.name = name
            self._schema = self._parser.tool_schema(name)
            self._state = "in_function"
        else:
            self._open_value(name, result)
        return end + 1

    # ------------------------------------------------------------ values

    def _open_value(self, key: str, result: ReadResult) -> None:
        self._key = key
        self._value = ""
        self._value_started = False
        self._streaming = schema_values.is_text(schema_values.property_schema(self._schema, key))
        separator = "{" if self._params == 0 else ", "
        self._params += 1
        result.arguments += separator + json.dumps(key, ensure_ascii=False) + ": "
        if self._streaming:
            result.arguments += '"'
        self._state = "value"

    def _read_value(self, text: str, result: ReadResult) -> int | None:
        if not self._value_started:
            if not text:
                return None
            self._value_started = True
            if text.startswith("\n"):  # the template's line break after the tag
                return 1
        hit = text.find(PARAMETER_END)
        if hit >= 0:
            value = text[:hit]
            self._value_text(value[:-1] if value.endswith("\n") else value, result)
            self._close_value(result)
            self._state = "in_function"
            return hit + len(PARAMETER_END)
        keep = held_suffix(text, _VALUE_ENDS)  # a line break may be the one before the tag
        if len(text) - keep <= 0:
            return None
        self._value_text(text[: len(text) - keep], result)
        return len(text) - keep

    def _value_text(self, text: str, result: ReadResult) -> None:
        if self._streaming:
            result.arguments += json.dumps(text, ensure_ascii=False)[1:-1]
        else:
            self._value += text

    def _close_value(self, result: ReadResult) -> None:
        if self._streaming:
            result.arguments += '"'
        else:
            schema = schema_values.property_schema(self._schema, self._key)
            value = schema_values.convert(self._value, schema)
            result.arguments += json.dumps(value, ensure_ascii=False)

    def _close_arguments(self, result: ReadResult) -> None:
        result.arguments += "}" if self._params else "{}"
        self._state = "closed"


def _could_become(text: str, markers: tuple[str, ...]) -> bool:
    """Could `text` still grow into one of the markers?"""
    return any(m.startswith(text) for m in markers)


class QwenXmlParser(ToolCallParser):
    start_markers = (START, FUNCTION)

    def new_reader(self, marker: str) -> CallReader:
        return QwenXmlReader(self, wrapped=marker == START)


def call_rules(rule: str, name: str, parameters: dict[str, Any], marker: Any) -> list[str]:
    """Lark rules forcing one call of `name` in this format (see tool_choice.py): `rule`
    itself, then helper rules named after it.

    Parameters come in the schema's order; optional ones may be left out. Plain-text values
    end at the first `</parameter>`; the others are JSON by their schema.
    """
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    required = set(parameters.get("required") or []) if isinstance(parameters, dict) else set()
    parts = [marker(START), _quote(f"\n{FUNCTION}{name}>\n")]
    helpers = []
    for j, (key, schema) in enumerate((properties or {}).items()):
        value_rule = f"{rule}_value{j}"
        helpers.append(_value_rule(value_rule, schema if isinstance(schema, dict) else {}))
        piece = f"{_quote(f'{PARAMETER}{key}>' + chr(10))} {value_rule}"
        parts.append(piece if key in required else f"({piece})?")
    parts += [_quote(f"{FUNCTION_END}\n"), marker(END)]
    return [f"{rule}: {' '.join(parts)}", *helpers]


def _value_rule(rule: str, schema: dict[str, Any]) -> str:
    """One parameter's value and its closing tag."""
    closing = _quote(f"\n{PARAMETER_END}\n")
    choices = schema.get("enum")
    if schema_values.is_text(schema) and isinstance(choices, list):
        return f"{rule}: (" + " | ".join(_quote(str(c)) for c in choices) + f") {closing}"
    if schema_values.schema_types(schema) == ["boolean"]:  # templates print Python's True
        words = " | ".join(_quote(w) for w in ("true", "false", "True", "False"))
        return f"{rule}: ({words}) {closing}"
    if schema_values.is_text(schema) or not schema_values.schema_types(schema):
        limit = schema.get("maxLength")
        count = f"{{0,{int(limit)}}}" if isinstance(limit, int) else "*"
        # Lazy: the text ends at the first "\n</parameter>\n", as the parser reads it.
        return f"{rule}[lazy]: /(?s:.{count})\\n<\\/parameter>\\n/"
    json_schema = {**schema, "x-guidance": JSON_STYLE}
    return f"{rule}: %json {json.dumps(json_schema, ensure_ascii=False)} {closing}"


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)

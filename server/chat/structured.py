"""response_format -> a grammar that constrains decoding (json_object, json_schema).

The JSON is laid out as json.dumps does (", " and ": ", no other whitespace), so the
grammar, not the model, decides where it ends: a schema whose strings, numbers and arrays
are bounded yields valid JSON even from a model that knows nothing.
"""

from __future__ import annotations

import json
from typing import Any

from ..parsers.base import JSON_STYLE


class ResponseFormatError(ValueError):
    def __init__(self, message: str, param: str = "response_format"):
        super().__init__(message)
        self.param = param


def response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema the answer must follow, or None for free text."""
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ResponseFormatError(f"Unsupported response_format type '{kind}'; expected "
                                  "'text', 'json_object' or 'json_schema'.",
                                  "response_format.type")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ResponseFormatError("response_format 'json_schema' needs a 'json_schema' "
                                  "object.", "response_format.json_schema")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict | bool):
        raise ResponseFormatError("json_schema.schema must be a JSON schema object.",
                                  "response_format.json_schema.schema")
    return schema if isinstance(schema, dict) else ({} if schema else {"not": {}})


def json_rule(rule: str, schema: dict[str, Any]) -> str:
    """A Lark rule `rule` matching one JSON value of `schema`."""
    options = {**JSON_STYLE, **(schema.get("x-guidance") or {})}
    body = json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)
    return f"{rule}: %json {body}"


def response_format_grammar(schema: dict[str, Any], tool_calls: str | None = None) -> str:
    """The whole answer is one JSON value; with `tool_calls` (Lark rules defining `calls`),
    the model may call tools instead."""
    if tool_calls is None:
        return "\n".join(["start: answer", json_rule("answer", schema)])
    return "\n".join(["start: answer | calls", json_rule("answer", schema), tool_calls])

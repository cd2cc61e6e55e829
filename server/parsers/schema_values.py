"""XML-style parameter values (always text) -> JSON values, guided by the tool's JSON schema.

`<parameter=days>\n3\n</parameter>` is the integer 3 when the schema says "integer", and the
string "3" when it says "string". A value that does not convert to any type the schema
allows is kept as the raw string, so nothing the model wrote is lost.
"""

from __future__ import annotations

import ast
import json
from typing import Any

_PREFERENCE = ("null", "boolean", "integer", "number", "object", "array", "string")


def property_schema(parameters: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    """The schema of property `key` in a tool's `parameters` schema, if it declares one."""
    if not isinstance(parameters, dict):
        return None
    properties = parameters.get("properties")
    if isinstance(properties, dict) and isinstance(properties.get(key), dict):
        return properties[key]
    return None


def schema_types(schema: dict[str, Any] | None) -> list[str]:
    """The JSON types a schema allows ("type", a list of types, anyOf/oneOf, const/enum)."""
    if not isinstance(schema, dict):
        return []
    declared = schema.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [t for t in declared if isinstance(t, str)]
    types: list[str] = []
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or []:
            types += [t for t in schema_types(option) if t not in types]
    choices = schema.get("enum") or ([schema["const"]] if "const" in schema else [])
    for choice in choices:
        kind = _json_type(choice)
        if kind not in types:
            types.append(kind)
    return types


def is_text(schema: dict[str, Any] | None) -> bool:
    """Does the value stay the raw text (so it can be streamed before it is complete)?"""
    return schema_types(schema) == ["string"]


def convert(raw: str, schema: dict[str, Any] | None) -> Any:
    types = schema_types(schema)
    if not types:
        # Undeclared: structured values are recognised, everything else stays text.
        value = _parse_structured(raw)
        return value if isinstance(value, dict | list) else raw
    if types == ["string"]:
        return raw
    for kind in sorted(types, key=lambda t: _PREFERENCE.index(t) if t in _PREFERENCE else 99):
        ok, value = _as_type(raw.strip(), kind)
        if ok:
            return value
    return raw


def _as_type(text: str, kind: str) -> tuple[bool, Any]:
    if kind == "null":
        return text.lower() in ("null", "none"), None
    if kind == "boolean":
        lowered = text.lower()
        return lowered in ("true", "false"), lowered == "true"
    if kind in ("integer", "number"):
        try:
            value = json.loads(text)
        except ValueError:
            return False, None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False, None
        if kind == "integer":
            if isinstance(value, float) and not value.is_integer():
                return False, None
            return True, int(value)
        return True, value
    if kind in ("object", "array"):
        value = _parse_structured(text)
        wanted = dict if kind == "object" else list
        return isinstance(value, wanted), value
    if kind == "string":
        return True, text
    return False, None


def _parse_structured(text: str) -> Any:
    """JSON, or a Python literal (models trained on Python sometimes write {'a': 1})."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        # Through JSON and back: tuples become lists; sets, bytes... are refused.
        return json.loads(json.dumps(ast.literal_eval(text)))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "string"

"""Bounds for what a JSON schema leaves unbounded, so constrained output always ends.

A weak model under a grammar can still write `123456789...` for an integer with no
maximum, or a string that never closes: the grammar allows it, and only max_tokens stops
it (finish_reason "length", no valid JSON). So, where the schema does not say:

- integers stay within +-(2**53 - 1) (what every JSON parser reads exactly: 16 digits),
- numbers within +-1e15, with at most 6 decimals (`multipleOf` 1e-6), no exponent,
- strings without an enum, const, pattern or format get `maxLength` 8192.

A schema's own `minimum` / `maximum` / `multipleOf` / `maxLength` always win: a client that
needs longer strings says so with maxLength. Only the grammar sees these bounds; the prompt
shows the client's schema as it was sent.
"""

from __future__ import annotations

from typing import Any

MAX_INTEGER = 2**53 - 1
MAX_NUMBER = 1e15
NUMBER_STEP = 1e-6
MAX_STRING = 8192

# Keys whose value is one subschema / a list of them / a mapping of names to them.
_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames",
        "unevaluatedItems", "unevaluatedProperties", "if", "then", "else")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAPPING = ("properties", "patternProperties", "$defs", "definitions")


def bounded(schema: Any) -> Any:
    """A copy of `schema` with the default bounds added where it has none."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = bounded(out[key])
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [bounded(s) for s in out[key]]
    for key in _MAPPING:
        if isinstance(out.get(key), dict):
            out[key] = {name: bounded(s) for name, s in out[key].items()}
    types = out.get("type")
    kinds = set(types) if isinstance(types, list) else {types}
    if "enum" in out or "const" in out:
        return out
    if "integer" in kinds and "number" not in kinds:
        _range(out, MAX_INTEGER)
    elif "number" in kinds:
        _range(out, MAX_NUMBER)
        out.setdefault("multipleOf", NUMBER_STEP)
    if "string" in kinds and not {"pattern", "format", "maxLength"} & out.keys():
        out["maxLength"] = MAX_STRING
    return out


def _range(schema: dict[str, Any], limit: float) -> None:
    if "maximum" not in schema and "exclusiveMaximum" not in schema:
        schema["maximum"] = limit
    if "minimum" not in schema and "exclusiveMinimum" not in schema:
        schema["minimum"] = -limit


def bounded_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's tools with bounded parameter schemas (for the grammar only)."""
    out = []
    for tool in tools:
        function = tool.get("function") or {}
        if isinstance(function.get("parameters"), dict):
            function = {**function, "parameters": bounded(function["parameters"])}
        out.append({**tool, "function": function})
    return out

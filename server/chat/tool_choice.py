"""tool_choice and parallel_tool_calls, enforced while decoding (not checked afterwards).

- "required" / a named function: a grammar in the model's own call format forces the
  opening marker, a declared function name and arguments that satisfy its JSON schema,
  then the end of the answer (grammar.py runs it; a reasoning block may come first).
- "auto" and "none": see declared_calls.py (calls only of declared tools; no opening
  marker at all). A single-token opening marker is banned with `BanTokens` for "none".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx

from ..parsers.registry import ToolFormat

# Calls one forced answer may hold when parallel calls are allowed (keeps it finite).
MAX_PARALLEL_CALLS = 8
# Line breaks a model may put before its first call (templates put "\n\n" after </think>).
_LEAD = r"/\n{0,2}/"


class ToolChoiceError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


def check_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The request's tools, checked: each a function with a name (and a parameters object)."""
    seen: set[str] = set()
    for i, tool in enumerate(tools or []):
        if tool.get("type", "function") != "function":
            raise ToolChoiceError(f"Unsupported tool type '{tool.get('type')}'; only "
                                  "'function' tools are supported.", f"tools[{i}].type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ToolChoiceError("A function tool needs a 'function' object.",
                                  f"tools[{i}].function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ToolChoiceError("A function needs a non-empty 'name'.",
                                  f"tools[{i}].function.name")
        if name in seen:
            raise ToolChoiceError(f"Two tools are named '{name}'.", f"tools[{i}].function.name")
        seen.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ToolChoiceError("'parameters' must be a JSON schema object.",
                                  f"tools[{i}].function.parameters")
    return list(tools or [])


def parse_tool_choice(tool_choice: str | dict[str, Any] | None,
                      tools: list[dict[str, Any]] | None) -> ToolChoice:
    """OpenAI's tool_choice (absent, a mode, or {"type": "function", "function": {...}})."""
    names = [t["function"]["name"] for t in tools or []]
    if tool_choice is None:
        return ToolChoice("auto" if names else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolChoiceError(f"Invalid tool_choice '{tool_choice}'; expected 'none', "
                                  "'auto', 'required' or a function.", "tool_choice")
        if tool_choice != "none" and not names:
            raise ToolChoiceError(f"tool_choice '{tool_choice}' needs tools.", "tool_choice")
        return ToolChoice(tool_choice)  # type: ignore[arg-type]
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ToolChoiceError("tool_choice must name a function as "
                              '{"type": "function", "function": {"name": ...}}.', "tool_choice")
    if name not in names:
        raise ToolChoiceError(f"tool_choice names '{name}', which is not in tools.",
                              "tool_choice.function.name")
    return ToolChoice("function", name)


def calls_rules(fmt: ToolFormat, tools: list[dict[str, Any]], choice: ToolChoice,
                parallel: bool, marker: Any) -> list[str]:
    """Lark rules defining `calls`: one call of the allowed functions (or, when parallel
    calls are allowed for "required", up to MAX_PARALLEL_CALLS of them).

    `marker(text)` renders a marker as a Lark element (GrammarTokenizer.marker).
    """
    functions = [t["function"] for t in tools]
    if choice.mode == "function":
        functions = [f for f in functions if f["name"] == choice.name]
    lines: list[str] = []
    names = []
    for i, function in enumerate(functions):
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        rule = f"call{i}"
        lines += fmt.call_rules(rule, function["name"], parameters, marker)
        names.append(rule)
    more = parallel and choice.mode != "function"
    separator = json.dumps(fmt.separator) + " " if fmt.separator else ""
    calls = f"call ({separator}call){{0,{MAX_PARALLEL_CALLS - 1}}}" if more else "call"
    return [f"calls: {_LEAD} {calls}", f"call: {' | '.join(names)}", *lines]


def forced_calls_grammar(fmt: ToolFormat, tools: list[dict[str, Any]], choice: ToolChoice,
                         parallel: bool, marker: Any) -> str:
    """The whole answer is tool calls (tool_choice "required" or a named function)."""
    return "\n".join(["start: calls", *calls_rules(fmt, tools, choice, parallel, marker)])


class BanTokens:
    """A logits processor that never lets `tokens` be sampled."""

    def __init__(self, tokens: list[int]):
        self._tokens = mx.array(tokens)

    def __call__(self, _tokens: mx.array, logits: mx.array) -> mx.array:
        banned = mx.array(-mx.inf, dtype=logits.dtype)
        return logits.at[:, self._tokens].minimum(banned)

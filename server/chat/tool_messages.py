"""OpenAI request messages -> the messages a chat template expects.

Clients send past tool calls with their arguments as a JSON *string*; templates iterate
them as a mapping (Qwen3.5: `arguments|items`), so they are parsed here. Tool results
get the function's `name` when the client left it out (some templates print it), text
content parts are joined, and the `developer` role becomes `system` (no open template
knows it).
"""

from __future__ import annotations

import json
from typing import Any


class MessageError(ValueError):
    """A message the server cannot use; `param` names it and `code` is OpenAI's error code."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Request messages (pydantic models or dicts) -> template-ready dicts."""
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for tool results
    for i, message in enumerate(messages):
        data = message if isinstance(message, dict) else message.model_dump(exclude_none=True)
        role = data.get("role")
        if data.get("content") is None and not (role == "assistant" and data.get("tool_calls")):
            raise MessageError("Message content must not be null.", f"messages[{i}].content")
        item: dict[str, Any] = {"role": _ROLES.get(role, role),
                                "content": _text(data.get("content"), f"messages[{i}]")}
        if data.get("reasoning_content") is not None:
            item["reasoning_content"] = data["reasoning_content"]
        if data.get("name") is not None:
            item["name"] = data["name"]
        if role == "assistant" and data.get("tool_calls"):
            item["tool_calls"] = [
                _tool_call(call, f"messages[{i}].tool_calls[{j}]")
                for j, call in enumerate(data["tool_calls"])
            ]
            for call in item["tool_calls"]:
                if call.get("id"):
                    call_names[call["id"]] = call["function"]["name"]
        if item["role"] == "tool":
            call_id = data.get("tool_call_id")
            if call_id is not None:
                item["tool_call_id"] = call_id
            if "name" not in item and call_id in call_names:
                item["name"] = call_names[call_id]
        out.append(item)
    return out


# Roles templates do not know, as the role they mean.
_ROLES = {"developer": "system", "function": "tool"}


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise MessageError("Message content must be a string or a list of parts.",
                           f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise MessageError(f"Content parts of type '{kind}' are not supported; only "
                               "'text'.", f"{where}.content[{j}].type", "unsupported_parameter")
        if not isinstance(part.get("text"), str):
            raise MessageError("A text part needs 'text'.", f"{where}.content[{j}].text")
        texts.append(part["text"])
    return "".join(texts)


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise MessageError("A tool call must be an object.", where)
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise MessageError("A tool call needs 'function' with a 'name'.", f"{where}.function")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise MessageError(f"Tool call arguments are not valid JSON: {exc}.",
                               f"{where}.function.arguments") from None
    if not isinstance(arguments, dict):
        raise MessageError("Tool call arguments must be a JSON object.",
                           f"{where}.function.arguments")
    out = {"type": call.get("type", "function"),
           "function": {"name": function["name"], "arguments": arguments}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out

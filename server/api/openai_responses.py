"""OpenAI Responses: POST /v1/responses, GET /v1/responses/{id}.

The body (input as a string or items: messages, function_call, function_call_output,
reasoning; instructions; function tools; text.format) is translated into the internal chat
request; `previous_response_id` puts the stored conversation in front of it. The writers
(responses_events.py) give output items: reasoning, message, function_call.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat.request import ChatMessage, ChatRequest, StrictModel
from .errors import invalid
from .response_store import ResponseStore, StoredResponse
from .responses_events import ResponseWriter
from .serving import (
    ServerContext,
    collect_one,
    context,
    new_id,
    read_body,
    sse,
    start_chat,
    unless_disconnected,
)
from .wire import parse_request


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOptions(StrictModel):
    format: TextFormat | None = None


class Reasoning(StrictModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None


class ResponsesRequest(StrictModel):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextOptions | None = None
    reasoning: Reasoning | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


def store_of(ctx: ServerContext) -> ResponseStore:
    store = ctx.stores.get("responses")
    if store is None:
        store = ctx.stores["responses"] = ResponseStore(ctx.settings.response_store_size)
    return store


# ---------------------------------------------------------------- request translation


def input_messages(items: str | list[dict[str, Any]]) -> list[ChatMessage]:
    """`input` -> chat messages: consecutive function calls are one assistant message with
    tool calls, a reasoning item goes with the assistant message that follows it."""
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    out: list[ChatMessage] = []
    reasoning: str | None = None
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid("An input item must be an object.", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise invalid(f"Unsupported role '{role}'.", f"{where}.role")
            message = ChatMessage(role=role, content=_item_text(item.get("content"), where))
            if role == "assistant" and reasoning is not None:
                message.reasoning_content, reasoning = reasoning, None
            out.append(message)
        elif kind == "function_call":
            call = _function_call(item, where)
            last = out[-1] if out else None
            if last is not None and last.role == "assistant" and last.tool_calls is not None:
                last.tool_calls.append(call)
            else:
                out.append(ChatMessage(role="assistant", content="", tool_calls=[call],
                                       reasoning_content=reasoning))
                reasoning = None
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise invalid("A function_call_output needs a 'call_id' string.", where)
            # The output is a string, or text parts (as newer clients send it).
            output = _item_text(item.get("output"), where)
            out.append(ChatMessage(role="tool", tool_call_id=call_id, content=output))
        elif kind == "reasoning":
            reasoning = _reasoning_text(item)
        else:
            raise invalid(f"Input items of type '{kind}' are not supported.", f"{where}.type")
    return out


def _item_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid("Message content must be a string or a list of parts.",
                      f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or \
                not isinstance(part.get("text"), str):
            raise invalid(f"Content parts of type '{kind}' are not supported; only text.",
                          f"{where}.content[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    name, arguments = item.get("name"), item.get("arguments", "{}")
    call_id = item.get("call_id")
    if not isinstance(name, str) or not isinstance(arguments, str) or \
            not isinstance(call_id, str):
        raise invalid("A function_call needs 'call_id', 'name' and 'arguments' strings.", where)
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _reasoning_text(item: dict[str, Any]) -> str:
    parts = item.get("content") or item.get("summary") or []
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict))


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses' flat function tools -> chat's {"type": "function", "function": {...}}."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise invalid(f"Unsupported tool type '{tool.get('type')}'; only 'function' "
                          "tools are supported.", f"tools[{i}].type")
        function = {k: v for k, v in tool.items() if k != "type"}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: TextOptions | None) -> dict[str, Any] | None:
    if text is None or text.format is None:
        return None
    fmt = text.format
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    if fmt.schema_ is None:
        raise invalid("text.format json_schema needs a 'schema'.", "text.format.schema")
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "output",
                                                   "schema": fmt.schema_}}


def to_chat_request(req: ResponsesRequest, conversation: list[ChatMessage]) -> ChatRequest:
    """`conversation`: the stored history and this request's input (instructions are not
    part of it: a next turn's instructions replace them)."""
    messages = list(conversation)
    if req.instructions:
        messages.insert(0, ChatMessage(role="system", content=req.instructions))
    kwargs = {}
    if req.reasoning is not None and req.reasoning.effort is not None:
        kwargs["enable_thinking"] = req.reasoning.effort not in ("none", "minimal")
    return ChatRequest(
        model=req.model, messages=messages, max_tokens=req.max_output_tokens,
        temperature=req.temperature, top_p=req.top_p, tools=_tools(req.tools),
        tool_choice=_tool_choice(req.tool_choice), parallel_tool_calls=req.parallel_tool_calls,
        response_format=_response_format(req.text), chat_template_kwargs=kwargs or None,
    )


# ---------------------------------------------------------------- endpoints


async def create_response(request: Request) -> Response:
    ctx = context(request)
    req = parse_request(ResponsesRequest, await read_body(request, ctx.settings.max_body_bytes))
    store = store_of(ctx)
    conversation: list[ChatMessage] = []
    if req.previous_response_id is not None:
        conversation = list(store.get(req.previous_response_id,
                                      "previous_response_id").conversation)
    conversation += input_messages(req.input)
    if not conversation:
        raise invalid("The input must not be empty.", "input")
    run = await start_chat(request, ctx, to_chat_request(req, conversation))
    writer = ResponseWriter(new_id("resp_"), req, run)

    def keep(body: dict[str, Any]) -> None:
        if req.store is not False:
            store.put(body["id"], StoredResponse(body, conversation + writer.output_messages()))

    if req.stream:
        return sse(ctx, run.handle, writer.stream(keep))
    state = await unless_disconnected(request, ctx, run.handle, collect_one(run))
    if isinstance(state, Response):
        return state
    body = writer.whole(state)
    keep(body)
    return JSONResponse(body)


async def retrieve_response(request: Request) -> Response:
    ctx = context(request)
    stored = store_of(ctx).get(request.path_params["response_id"])
    return JSONResponse(stored.body)


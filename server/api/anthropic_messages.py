"""Anthropic Messages: POST /v1/messages and /v1/messages/count_tokens.

The body (system, content blocks, tools with input_schema, tool_choice, thinking) is
translated into the internal chat request; the writers turn parsed deltas into content
blocks (thinking, text, tool_use) and Anthropic's event sequence. Usage follows Anthropic:
`input_tokens` are the prompt tokens not read from the prefix cache,
`cache_read_input_tokens` the ones that were.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat.request import ChatMessage, ChatRequest, StrictModel
from ..engine.generation import GenerationFailed
from ..parsers.base import assemble_calls
from .errors import anthropic_error, invalid
from .serving import (
    ChatRun,
    ChoiceState,
    SSEEvent,
    check_model,
    collect_one,
    context,
    count_prompt_tokens,
    new_id,
    off_loop,
    read_body,
    require_ready,
    sse,
    start_chat,
    unless_disconnected,
)
from .wire import dumps, parse_request


class TextBlock(StrictModel):
    type: Literal["text"]
    text: str


class Block(StrictModel):
    """Any content block; which fields it needs depends on its type (checked below)."""

    type: str
    text: str | None = None
    thinking: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None


class Message(StrictModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(StrictModel):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None
    type: str | None = None

    def function(self) -> dict[str, Any]:
        """As an OpenAI function; keys only when given, as OpenAI clients send them."""
        out: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        if self.strict is not None:
            out["strict"] = self.strict
        out["parameters"] = self.input_schema
        return out


class ToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(StrictModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class MessagesRequest(StrictModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    metadata: dict[str, Any] | None = None


class CountTokensRequest(MessagesRequest):
    max_tokens: int = 1  # count_tokens takes no max_tokens


# ---------------------------------------------------------------- request translation


def to_chat_request(req: MessagesRequest) -> ChatRequest:
    messages: list[ChatMessage] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else \
            "\n\n".join(b.text for b in req.system)
        messages.append(ChatMessage(role="system", content=system))
    for i, message in enumerate(req.messages):
        messages += _chat_messages(message, f"messages[{i}]")
    tools = [{"type": "function", "function": t.function()} for t in req.tools or []]
    kwargs = {}
    if req.thinking is not None:
        kwargs["enable_thinking"] = req.thinking.type != "disabled"
    choice = req.tool_choice
    # Anthropic clients ask for a fixed max_tokens (Claude Code: 32,000) whatever the
    # context holds: it is a cap, generation stops where the context ends.
    return ChatRequest(
        model=req.model, messages=messages, max_tokens=req.max_tokens,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        stop=req.stop_sequences, tools=tools or None,
        tool_choice=_tool_choice(choice) if tools or choice else None,
        parallel_tool_calls=False if choice and choice.disable_parallel_tool_use else None,
        chat_template_kwargs=kwargs or None,
    ).with_max_tokens_as_cap()


def _tool_choice(choice: ToolChoice | None) -> str | dict[str, Any]:
    if choice is None or choice.type == "auto":
        return "auto"
    if choice.type == "any":
        return "required"
    if choice.type == "none":
        return "none"
    if not choice.name:
        raise invalid("tool_choice of type 'tool' needs a 'name'.", "tool_choice.name")
    return {"type": "function", "function": {"name": choice.name}}


def _chat_messages(message: Message, where: str) -> list[ChatMessage]:
    """One Anthropic message -> chat messages: a user turn's tool_result blocks become tool
    messages (before its text); an assistant turn's thinking, text and tool_use blocks one
    assistant message."""
    if isinstance(message.content, str):
        return [ChatMessage(role=message.role, content=message.content)]
    texts, reasoning, calls, results = [], [], [], []
    for j, block in enumerate(message.content):
        at = f"{where}.content[{j}]"
        if block.type == "text" and block.text is not None:
            texts.append(block.text)
        elif block.type == "thinking" and message.role == "assistant":
            reasoning.append(block.thinking or "")
        elif block.type == "redacted_thinking":
            continue
        elif block.type == "tool_use" and message.role == "assistant":
            if not block.id or not block.name:
                raise invalid("A tool_use block needs 'id' and 'name'.", at)
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": block.input or {}}})
        elif block.type == "tool_result" and message.role == "user":
            if not block.tool_use_id:
                raise invalid("A tool_result block needs 'tool_use_id'.", at)
            results.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id,
                                       content=_result_text(block, at)))
        else:
            raise invalid(f"Content blocks of type '{block.type}' are not supported in "
                          f"{message.role} messages here.", f"{at}.type")
    out = list(results)
    if message.role == "assistant":
        out.append(ChatMessage(role="assistant", content="".join(texts),
                               tool_calls=calls or None,
                               reasoning_content="".join(reasoning) or None))
    elif texts or not results:
        out.append(ChatMessage(role="user", content="".join(texts)))
    return out


def _result_text(block: Block, where: str) -> str:
    content = block.content
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        parts = []
        for k, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid("tool_result content must be text blocks.",
                              f"{where}.content[{k}]")
            parts.append(part["text"])
        text = "".join(parts)
    return f"Error: {text}" if block.is_error else text


# ---------------------------------------------------------------- endpoints


async def create_message(request: Request) -> Response:
    ctx = context(request)
    req = parse_request(MessagesRequest, await read_body(request, ctx.settings.max_body_bytes))
    run = await start_chat(request, ctx, to_chat_request(req))
    message_id = new_id("msg_")
    if req.stream:
        return sse(ctx, run.handle, stream_message(run, message_id, req.model))
    state = await unless_disconnected(request, ctx, run.handle, collect_one(run))
    if isinstance(state, Response):
        return state
    return JSONResponse(_message(message_id, req.model, state, run))


async def count_tokens(request: Request) -> Response:
    ctx = context(request)
    body = await read_body(request, ctx.settings.max_body_bytes)
    req = parse_request(CountTokensRequest, body)
    check_model(ctx, req.model)
    require_ready(ctx.engine)
    tokens = await off_loop(ctx, count_prompt_tokens, ctx, to_chat_request(req))
    return JSONResponse({"input_tokens": tokens})


# ---------------------------------------------------------------- responses


def _stop_reason(state: ChoiceState) -> str:
    if state.tool_calls and state.finish_reason == "stop":
        return "tool_use"
    if state.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if state.stop_string is not None else "end_turn"


def _usage(run: ChatRun, output_tokens: int) -> dict[str, int]:
    cached = run.handle.cached_tokens
    return {"input_tokens": run.handle.prompt_tokens - cached,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": output_tokens}


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _message(message_id: str, model: str, state: ChoiceState, run: ChatRun) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if state.reasoning:
        content.append({"type": "thinking", "thinking": state.reasoning, "signature": ""})
    if state.content or not state.tool_calls:
        content.append({"type": "text", "text": state.content})
    for call in assemble_calls(state.tool_calls):
        content.append({"type": "tool_use", "id": tool_use_id(call["id"]),
                        "name": call["function"]["name"],
                        "input": _tool_input(call["function"]["arguments"])})
    return {"id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": _stop_reason(state),
            "stop_sequence": state.stop_string, "usage": _usage(run, state.tokens)}


def _event(kind: str, **fields: Any) -> tuple[str, str]:
    return kind, dumps({"type": kind, **fields})


class _Blocks:
    """The content block being streamed: a new kind of output closes it and opens the next."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None

    def open(self, kind: str, block: dict[str, Any]) -> list[SSEEvent]:
        events = self.close()
        self.index += 1
        self.kind = kind
        return events + [_event("content_block_start", index=self.index, content_block=block)]

    def close(self) -> list[SSEEvent]:
        if self.kind is None:
            return []
        self.kind = None
        return [_event("content_block_stop", index=self.index)]

    def delta(self, kind: str, block: dict[str, Any], delta: dict[str, Any]) -> list[SSEEvent]:
        events = self.open(kind, block) if self.kind != kind else []
        return events + [_event("content_block_delta", index=self.index, delta=delta)]


async def stream_message(run: ChatRun, message_id: str, model: str) -> AsyncIterator[SSEEvent]:
    """message_start, content blocks (start, deltas, stop), message_delta, message_stop."""
    state = ChoiceState(run.parsers())
    blocks = _Blocks()
    started = False
    try:
        async for deltas in run.handle.deltas():
            if not started:  # after the first step, so cached prompt tokens are known
                started = True
                message = {"id": message_id, "type": "message", "role": "assistant",
                           "model": model, "content": [], "stop_reason": None,
                           "stop_sequence": None, "usage": _usage(run, 0)}
                yield _event("message_start", message=message)
                yield _event("ping")
            for delta in deltas:
                parsed = state.apply(delta)
                if parsed.reasoning:
                    for event in blocks.delta(
                            "thinking", {"type": "thinking", "thinking": "", "signature": ""},
                            {"type": "thinking_delta", "thinking": parsed.reasoning}):
                        yield event
                if parsed.content:
                    for event in blocks.delta("text", {"type": "text", "text": ""},
                                              {"type": "text_delta", "text": parsed.content}):
                        yield event
                for fragment in parsed.tool_calls:
                    for event in _tool_events(blocks, fragment):
                        yield event
    except GenerationFailed as exc:
        yield "error", dumps(anthropic_error(exc.status, str(exc)))
        return
    for event in blocks.close():
        yield event
    yield _event("message_delta",
                 delta={"stop_reason": _stop_reason(state), "stop_sequence": state.stop_string},
                 usage=_usage(run, state.tokens))
    yield _event("message_stop")


def _tool_events(blocks: _Blocks, fragment: dict[str, Any]) -> list[SSEEvent]:
    function = fragment.get("function", {})
    events: list[SSEEvent] = []
    if "id" in fragment:
        block = {"type": "tool_use", "id": tool_use_id(fragment["id"]),
                 "name": function.get("name", ""), "input": {}}
        events += blocks.open("tool_use", block)
    if function.get("arguments"):
        events.append(_event("content_block_delta", index=blocks.index,
                             delta={"type": "input_json_delta",
                                    "partial_json": function["arguments"]}))
    return events

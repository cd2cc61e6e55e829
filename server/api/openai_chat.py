"""OpenAI chat completions: POST /v1/chat/completions.

The body validates straight into the internal `ChatRequest` (it has this API's shape); the
writers turn parsed deltas into `chat.completion` objects or `chat.completion.chunk` events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat.output import ParsedDelta
from ..chat.request import ChatRequest
from ..engine.generation import GenerationFailed, TokenLogprob
from ..parsers.base import assemble_calls
from .errors import error_body
from .serving import (
    ChatRun,
    ChoiceState,
    ResponseMeta,
    context,
    read_body,
    sse,
    start_chat,
    unless_disconnected,
)
from .wire import TextChunks, Usage, WireModel, dumps, make_usage, parse_request

DONE = "[DONE]"
ChatCompletionRequest = ChatRequest  # this API's body is the internal request


class TopLogprob(WireModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(WireModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(WireModel):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class ChatMessageOut(WireModel):
    _always = ("role",)
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(WireModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletion(WireModel):
    _always = ("object",)
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(WireModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(WireModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(WireModel):
    _always = ("object",)
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


async def chat_completions(request: Request) -> Response:
    ctx = context(request)
    body = await read_body(request, ctx.settings.max_body_bytes)
    req = parse_request(ChatRequest, body)
    run = await start_chat(request, ctx, req)
    meta = ResponseMeta.new("chatcmpl-", ctx.settings.model_id)
    if req.stream:
        return sse(ctx, run.handle, stream_chat(run, meta, req.include_usage()))
    result = await unless_disconnected(request, ctx, run.handle, collect_chat(run, meta))
    return result if isinstance(result, Response) else JSONResponse(result.wire())


def _top_entries(token: TokenLogprob) -> list[TopLogprob]:
    return [TopLogprob(token=t, logprob=lp, bytes=raw) for t, raw, lp in token.top]


def chat_logprobs(tokens: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprobOut(token=t.token, logprob=t.logprob, bytes=t.bytes,
                        top_logprobs=_top_entries(t))
        for t in tokens
    ])


def _finish_reason(reason: str | None, called_tools: bool) -> str | None:
    return "tool_calls" if reason == "stop" and called_tools else reason


def _usage(run: ChatRun, completion_tokens: int) -> Usage:
    return make_usage(run.handle.prompt_tokens, completion_tokens, run.handle.cached_tokens)


async def collect_chat(run: ChatRun, meta: ResponseMeta) -> ChatCompletion:
    choices = [ChoiceState(run.parsers()) for _ in run.handle.specs]
    async for deltas in run.handle.deltas():
        for delta in deltas:
            choices[delta.choice].apply(delta)
    want_logprobs = run.handle.specs[0].logprobs is not None
    return ChatCompletion(
        id=meta.id, created=meta.created, model=meta.model, system_fingerprint=meta.fingerprint,
        choices=[
            ChatChoice(
                index=i,
                message=_chat_message(c),
                logprobs=chat_logprobs(c.logprobs) if want_logprobs else None,
                finish_reason=_finish_reason(c.finish_reason, bool(c.tool_calls)),
            )
            for i, c in enumerate(choices)
        ],
        usage=_usage(run, sum(c.tokens for c in choices)),
    )


def _chat_message(choice: ChoiceState) -> ChatMessageOut:
    message = ChatMessageOut(content=choice.content if choice.content or not choice.tool_calls
                             else None)
    if choice.reasoning:
        message.reasoning_content = choice.reasoning
    if choice.tool_calls:
        message.tool_calls = assemble_calls(choice.tool_calls)
    return message


async def stream_chat(run: ChatRun, meta: ResponseMeta, include_usage: bool
                      ) -> AsyncIterator[str]:
    """SSE payloads: a role chunk per choice, content chunks, a finish chunk per choice,
    the usage chunk (empty choices) when asked for, then [DONE]."""
    choices = [ChoiceState(run.parsers()) for _ in run.handle.specs]

    def chunk(choice_list: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        out = ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model,
                                  system_fingerprint=meta.fingerprint, choices=choice_list)
        if include_usage:
            out.usage = usage
        return dumps(out.wire())

    def choice(index: int, delta: ChatDelta, logprobs: ChoiceLogprobs | None = None,
               finish: str | None = None) -> ChatChunkChoice:
        return ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)

    content_chunk = TextChunks(lambda i, text: chunk([choice(i, ChatDelta(content=text))]))
    for i in range(len(choices)):
        yield chunk([choice(i, ChatDelta(role="assistant", content=""))])
    try:
        async for deltas in run.handle.deltas():
            for delta in deltas:
                state = choices[delta.choice]
                parsed = state.apply(delta)
                logprobs = chat_logprobs(delta.logprobs) if delta.logprobs else None
                if logprobs is None and parsed.content and not (parsed.reasoning
                                                                 or parsed.tool_calls):
                    yield content_chunk(delta.choice, parsed.content)
                elif not parsed.empty() or logprobs:
                    yield chunk([choice(delta.choice, _chat_delta(parsed), logprobs)])
                if delta.finish_reason:
                    reason = _finish_reason(delta.finish_reason, bool(state.tool_calls))
                    yield chunk([choice(delta.choice, ChatDelta(), finish=reason)])
    except GenerationFailed as exc:
        yield dumps(error_body(exc.status, str(exc), code="generation_failed"))
        yield DONE
        return
    if include_usage:
        yield chunk([], _usage(run, sum(c.tokens for c in choices)))
    yield DONE


def _chat_delta(parsed: ParsedDelta) -> ChatDelta:
    delta = ChatDelta()
    if parsed.content:
        delta.content = parsed.content
    if parsed.reasoning:
        delta.reasoning_content = parsed.reasoning
    if parsed.tool_calls:
        delta.tool_calls = parsed.tool_calls
    return delta

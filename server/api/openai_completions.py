"""OpenAI text completions: POST /v1/completions (no chat template, no parsers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat.prompts import completion_prompts
from ..chat.request import Generation
from ..chat.specs import build_specs, check_completion_options
from ..engine.generation import GenerationFailed, GenerationHandle, TokenLogprob
from .errors import error_body
from .serving import (
    ResponseMeta,
    check_model,
    context,
    off_loop,
    read_body,
    require_ready,
    sse,
    unless_disconnected,
)
from .wire import TextChunks, Usage, WireModel, dumps, make_usage, parse_request

DONE = "[DONE]"


class CompletionRequest(Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class CompletionLogprobs(WireModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(WireModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(WireModel):
    """Both the non-streaming response and each streamed chunk (OpenAI uses one shape)."""

    _always = ("object",)
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


async def completions(request: Request) -> Response:
    ctx = context(request)
    body = await read_body(request, ctx.settings.max_body_bytes)
    req = parse_request(CompletionRequest, body)
    check_model(ctx, req.model)
    check_completion_options(req)
    require_ready(ctx.engine)
    prompts = await off_loop(ctx, completion_prompts, ctx.engine.tokenizer, req,
                             ctx.engine.vocab_size)
    specs = build_specs(req, prompts, req.logprobs, ctx.limits())
    handle = ctx.engine.submit(request.state.request_id, specs, sum(len(x) for x in prompts))
    meta = ResponseMeta.new("cmpl-", ctx.settings.model_id)
    if req.stream:
        return sse(ctx, handle, stream_completion(handle, meta, req.include_usage()))
    result = await unless_disconnected(request, ctx, handle, collect_completion(handle, meta))
    return result if isinstance(result, Response) else JSONResponse(result.wire())


def _usage(handle: GenerationHandle, completion_tokens: int) -> Usage:
    return make_usage(handle.prompt_tokens, completion_tokens, handle.cached_tokens)


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.token)
    return CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[{text: lp for text, _, lp in t.top} for t in tokens],
        text_offset=offsets,
    )


async def collect_completion(handle: GenerationHandle, meta: ResponseMeta) -> Completion:
    texts = [""] * len(handle.specs)
    logprobs: list[list[TokenLogprob]] = [[] for _ in handle.specs]
    reasons: list[str | None] = [None] * len(handle.specs)
    tokens = 0
    async for deltas in handle.deltas():
        for d in deltas:
            texts[d.choice] += d.text
            logprobs[d.choice] += d.logprobs or []
            reasons[d.choice] = d.finish_reason or reasons[d.choice]
            tokens += d.num_tokens
    want_logprobs = handle.specs[0].logprobs is not None
    return Completion(
        id=meta.id, created=meta.created, model=meta.model, system_fingerprint=meta.fingerprint,
        choices=[
            CompletionChoice(
                index=i, text=texts[i],
                logprobs=completion_logprobs(logprobs[i], 0) if want_logprobs else None,
                finish_reason=reasons[i],
            )
            for i in range(len(texts))
        ],
        usage=_usage(handle, tokens),
    )


async def stream_completion(
    handle: GenerationHandle, meta: ResponseMeta, include_usage: bool
) -> AsyncIterator[str]:
    offsets = [0] * len(handle.specs)
    tokens = 0

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        out = Completion(id=meta.id, created=meta.created, model=meta.model,
                         system_fingerprint=meta.fingerprint, choices=choices)
        if include_usage:
            out.usage = usage
        return dumps(out.wire())

    text_chunk = TextChunks(lambda i, text: chunk([CompletionChoice(
        index=i, text=text, logprobs=None, finish_reason=None)]))
    try:
        async for deltas in handle.deltas():
            for d in deltas:
                tokens += d.num_tokens
                logprobs = None
                if d.logprobs:
                    logprobs = completion_logprobs(d.logprobs, offsets[d.choice])
                offsets[d.choice] += len(d.text)
                if d.text and not (logprobs or d.finish_reason):
                    yield text_chunk(d.choice, d.text)
                elif d.text or logprobs or d.finish_reason:
                    yield chunk([CompletionChoice(index=d.choice, text=d.text,
                                                  logprobs=logprobs,
                                                  finish_reason=d.finish_reason)])
    except GenerationFailed as exc:
        yield dumps(error_body(exc.status, str(exc), code="generation_failed"))
        yield DONE
        return
    if include_usage:
        yield chunk([], _usage(handle, tokens))
    yield DONE

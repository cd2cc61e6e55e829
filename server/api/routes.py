"""HTTP endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sse_starlette import EventSourceResponse
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from swan_serve import __version__

from ..chat.chat_features import FeatureError, RequestTools
from ..chat.output import ParserFactory, PassThroughParser
from ..chat.prompts import chat_prompt, completion_prompts
from ..chat.specs import (
    Limits,
    build_specs,
    check_chat_options,
    check_completion_options,
    max_new_tokens,
)
from ..engine.engine import Engine, EngineState
from ..engine.generation import GenerationFailed, GenerationHandle
from ..metrics import PROMETHEUS_CONTENT_TYPE
from ..settings import ServerSettings
from . import protocol as p
from .errors import APIError, invalid
from .responses import (
    ResponseMeta,
    collect_chat,
    collect_completion,
    stream_chat,
    stream_completion,
)

T = TypeVar("T")


@dataclass
class ServerContext:
    settings: ServerSettings
    engine: Engine
    # Prompt rendering (jinja + tokenizer) runs here, off the event loop, one at a time.
    tokenizer_pool: ThreadPoolExecutor
    parsers: ParserFactory = PassThroughParser
    started: int = 0

    def limits(self) -> Limits:
        return Limits(
            context_length=self.engine.context_length,
            vocab_size=self.engine.vocab_size,
            max_tokens_default=self.settings.max_tokens_default,
            max_n=self.settings.max_n,
            sampling_defaults=self.engine.sampling_defaults,
        )


def _context(request: Request) -> ServerContext:
    return request.app.state.context


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes before reading it all."""
    too_large = APIError(413, f"The request body is larger than {limit} bytes.",
                         code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "The client disconnected while sending the body.") from None
    return b"".join(chunks)


def _require_ready(engine: Engine) -> None:
    if engine.state is not EngineState.READY:
        raise APIError(503, "The model is not ready yet; retry shortly.", code="model_not_ready",
                       headers={"Retry-After": "1"})


def _check_model(ctx: ServerContext, model: str) -> None:
    # Only served names match: a request never makes the server load a path or download.
    if model not in ctx.settings.served_model_names:
        raise APIError(404, f"The model '{model}' does not exist on this server.",
                       param="model", code="model_not_found")


async def _off_loop(ctx: ServerContext, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(ctx.tokenizer_pool, fn, *args)


def _meta(ctx: ServerContext, prefix: str) -> ResponseMeta:
    return ResponseMeta(id=f"{prefix}-{uuid.uuid4().hex}", model=ctx.settings.model_id,
                        fingerprint=f"swan-serve-{__version__}")


async def chat_completions(request: Request) -> Response:
    ctx = _context(request)
    body = await read_body(request, ctx.settings.max_body_bytes)
    req = p.parse_request(p.ChatCompletionRequest, body)
    _check_model(ctx, req.model)
    check_chat_options(req)
    _require_ready(ctx.engine)
    features = ctx.engine.chat_features
    try:
        tools = features.check_request(req)
    except FeatureError as exc:
        raise invalid(str(exc), exc.param) from None
    # One trip off the event loop for all of it: under load each thread hand-off costs.
    prompt, processors = await _off_loop(ctx, _chat_prompt_and_processors, ctx, req, tools)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    specs = build_specs(req, [prompt], logprobs, ctx.limits(), processors, chat_turn=True)
    parsers = features.parser_factory(tools, prompt)
    handle = ctx.engine.submit(request.state.request_id, specs, len(prompt))
    meta = _meta(ctx, "chatcmpl")
    if req.stream:
        return _sse(ctx, handle, stream_chat(handle, meta, parsers, req.include_usage()))
    result = await _unless_disconnected(request, ctx, handle,
                                        collect_chat(handle, meta, parsers))
    return result if isinstance(result, Response) else JSONResponse(result.wire())


def _chat_prompt_and_processors(ctx: ServerContext, req: p.ChatCompletionRequest,
                                tools: RequestTools) -> tuple[list[int], Any]:
    """The prompt's token ids and the request's logits processors (jinja, tokenizer and
    grammar compilation: the slow part of a request before it is queued)."""
    prompt = chat_prompt(ctx.engine.tokenizer, ctx.engine.prompt_encoder, req)
    max_tokens = max_new_tokens(req, len(prompt), ctx.limits())
    try:
        return prompt, ctx.engine.chat_features.processors(tools, prompt, max_tokens)
    except FeatureError as exc:
        raise invalid(str(exc), exc.param) from None


async def completions(request: Request) -> Response:
    ctx = _context(request)
    body = await read_body(request, ctx.settings.max_body_bytes)
    req = p.parse_request(p.CompletionRequest, body)
    _check_model(ctx, req.model)
    check_completion_options(req)
    _require_ready(ctx.engine)
    prompts = await _off_loop(ctx, completion_prompts, ctx.engine.tokenizer, req,
                              ctx.engine.vocab_size)
    specs = build_specs(req, prompts, req.logprobs, ctx.limits())
    handle = ctx.engine.submit(request.state.request_id, specs, sum(len(x) for x in prompts))
    meta = _meta(ctx, "cmpl")
    if req.stream:
        return _sse(ctx, handle, stream_completion(handle, meta, req.include_usage()))
    result = await _unless_disconnected(request, ctx, handle, collect_completion(handle, meta))
    return result if isinstance(result, Response) else JSONResponse(result.wire())


def _sse(ctx: ServerContext, handle: GenerationHandle, events: AsyncIterator[str]) -> Response:
    async def guarded() -> AsyncIterator[bytes]:
        # sse-starlette cancels this generator when the client goes away; `finally`
        # then frees the sequences (a no-op once they all finished). Payloads are one line
        # of JSON (or [DONE]), so each event is framed here without sse-starlette's
        # per-event parsing.
        try:
            async for payload in events:
                yield b"data: " + payload.encode() + b"\n\n"
        finally:
            ctx.engine.cancel(handle)

    return EventSourceResponse(guarded(), sep="\n", ping=15)


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(
    request: Request, ctx: ServerContext, handle: GenerationHandle, work: Any
) -> Any:
    """Runs `work`; if the client hangs up first, cancels the generation instead."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
            ctx.engine.cancel(handle)
    if not work_task.done() or work_task.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    try:
        return work_task.result()
    except GenerationFailed as exc:
        ctx.engine.cancel(handle)  # frees any of its choices still running
        raise APIError(exc.status, str(exc), code="generation_failed") from None


async def list_models(request: Request) -> Response:
    ctx = _context(request)
    cards = [p.ModelCard(id=name, created=ctx.started) for name in ctx.settings.served_model_names]
    return JSONResponse(p.ModelList(data=cards).wire())


async def health(request: Request) -> Response:
    engine = _context(request).engine
    if engine.state is EngineState.READY:
        body: dict = {"status": "ok"}
        if engine.distributed is not None:
            body["distributed"] = engine.distributed.describe()
        return JSONResponse(body)
    if engine.state is EngineState.LOADING:
        body = {"status": "loading", "phase": engine.loading_phase,
                "progress": round(engine.loading_progress, 4)}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "error", "message": engine.failure or "stopped"},
                        status_code=503)


async def metrics(request: Request) -> Response:
    engine = _context(request).engine
    text = engine.metrics.render()
    if engine.distributed is not None:
        text += engine.distributed.prometheus()
    return PlainTextResponse(text, headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})

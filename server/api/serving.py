"""What every API adapter shares: the server context, reading bodies, and the one path from
an internal chat request to the engine and back (parsed deltas, SSE, disconnects).

An adapter validates its wire body, builds a `ChatRequest`, calls `start_chat`, and writes
what `ChoiceState.apply` parses out of each engine delta in its own shape.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sse_starlette import EventSourceResponse
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from swan_serve import __version__

from ..chat.chat_features import FeatureError, RequestTools
from ..chat.output import OutputParser, ParsedDelta, ParserFactory
from ..chat.prompts import chat_prompt
from ..chat.request import ChatRequest
from ..chat.specs import Limits, build_specs, check_chat_options, max_new_tokens
from ..engine.engine import Engine, EngineState
from ..engine.generation import Delta, GenerationFailed, GenerationHandle, TokenLogprob
from ..settings import ServerSettings
from .errors import APIError, invalid

T = TypeVar("T")


@dataclass
class ServerContext:
    settings: ServerSettings
    engine: Engine
    # Prompt rendering (jinja + tokenizer) runs here, off the event loop, one at a time.
    tokenizer_pool: ThreadPoolExecutor
    started: int = 0
    # Streams in progress (ended with an error event when the server shuts down).
    open_streams: set[GenerationHandle] = field(default_factory=set)
    # Anything an adapter keeps between requests (the Responses API's stored responses).
    stores: dict[str, Any] = field(default_factory=dict)

    def limits(self) -> Limits:
        return Limits(
            context_length=self.engine.context_length,
            vocab_size=self.engine.vocab_size,
            max_tokens_default=self.settings.max_tokens_default,
            max_n=self.settings.max_n,
            sampling_defaults=self.engine.sampling_defaults,
        )


def context(request: Request) -> ServerContext:
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


def require_ready(engine: Engine) -> None:
    if engine.state is not EngineState.READY:
        raise APIError(503, "The model is not ready yet; retry shortly.", code="model_not_ready",
                       headers={"Retry-After": "1"})


def check_model(ctx: ServerContext, model: str) -> None:
    # Only served names match: a request never makes the server load a path or download.
    if model not in ctx.settings.served_model_names:
        raise APIError(404, f"The model '{model}' does not exist on this server.",
                       param="model", code="model_not_found")


async def off_loop(ctx: ServerContext, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(ctx.tokenizer_pool, fn, *args)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ResponseMeta:
    """id, creation time, model and fingerprint of one response."""

    id: str
    model: str
    fingerprint: str = f"swan-serve-{__version__}"
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseMeta:
        return cls(new_id(prefix), model)


@dataclass
class ChatRun:
    """A chat request on its way through the engine."""

    handle: GenerationHandle
    parsers: ParserFactory
    tools: RequestTools


async def start_chat(request: Request, ctx: ServerContext, req: ChatRequest) -> ChatRun:
    """Checks, renders and submits one internal chat request (the same for every API)."""
    check_model(ctx, req.model)
    check_chat_options(req)
    require_ready(ctx.engine)
    features = ctx.engine.chat_features
    try:
        tools = features.check_request(req)
    except FeatureError as exc:
        raise invalid(str(exc), exc.param) from None
    # One trip off the event loop for all of it: under load each thread hand-off costs.
    prompt, processors = await off_loop(ctx, _prompt_and_processors, ctx, req, tools)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    specs = build_specs(req, [prompt], logprobs, ctx.limits(), processors, chat_turn=True)
    parsers = features.parser_factory(tools, prompt)
    handle = ctx.engine.submit(request.state.request_id, specs, len(prompt))
    received = getattr(request.state, "received", None)
    if received is not None:
        ctx.engine.metrics.count_adapter(request.url.path, time.perf_counter() - received)
    return ChatRun(handle, parsers, tools)


def _prompt_and_processors(ctx: ServerContext, req: ChatRequest,
                           tools: RequestTools) -> tuple[list[int], Any]:
    """The prompt's token ids and the request's logits processors (jinja, tokenizer and
    grammar compilation: the slow part of a request before it is queued)."""
    prompt = chat_prompt(ctx.engine.tokenizer, ctx.engine.prompt_encoder, req)
    max_tokens = max_new_tokens(req, len(prompt), ctx.limits())
    try:
        return prompt, ctx.engine.chat_features.processors(tools, prompt, max_tokens)
    except FeatureError as exc:
        raise invalid(str(exc), exc.param) from None


def count_prompt_tokens(ctx: ServerContext, req: ChatRequest) -> int:
    """The prompt a chat request would have, counted (no generation)."""
    return len(chat_prompt(ctx.engine.tokenizer, ctx.engine.prompt_encoder, req))


@dataclass
class ChoiceState:
    """One choice's output so far, parsed into content, reasoning and tool calls."""

    parser: OutputParser
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_string: str | None = None
    tokens: int = 0
    # Tokens of deltas that were only reasoning (a delta is usually one token).
    reasoning_tokens: int = 0

    def apply(self, delta: Delta) -> ParsedDelta:
        parsed = self.parser.feed(delta.text)
        if delta.finish_reason:
            tail = self.parser.finish()
            parsed = ParsedDelta(parsed.content + tail.content, parsed.reasoning + tail.reasoning,
                                 parsed.tool_calls + tail.tool_calls)
            self.finish_reason = delta.finish_reason
            self.stop_string = delta.stop_string
        self.content += parsed.content
        self.reasoning += parsed.reasoning
        self.tool_calls += parsed.tool_calls
        self.logprobs += delta.logprobs or []
        self.tokens += delta.num_tokens
        if parsed.reasoning and not (parsed.content or parsed.tool_calls):
            self.reasoning_tokens += delta.num_tokens
        return parsed


async def collect_one(run: ChatRun) -> ChoiceState:
    """The whole answer of a one-choice request."""
    state = ChoiceState(run.parsers())
    async for deltas in run.handle.deltas():
        for delta in deltas:
            state.apply(delta)
    return state


STOPPING_MESSAGE = "The server is shutting down; the response was cut short."

# An SSE event: a data payload (one line of JSON), or (event name, payload).
SSEEvent = str | tuple[str, str]


def sse(ctx: ServerContext, handle: GenerationHandle, events: AsyncIterator[SSEEvent]) -> Response:
    """Streams `events` (an adapter's writer, which turns GenerationFailed into an error event
    in its API's shape). While it runs, `stop_streams` can end it that way."""

    async def guarded() -> AsyncIterator[bytes]:
        # sse-starlette cancels this generator when the client goes away; `finally`
        # then frees the sequences (a no-op once they all finished).
        ctx.open_streams.add(handle)
        try:
            async for event in events:
                if isinstance(event, str):
                    yield b"data: " + event.encode() + b"\n\n"
                else:
                    yield f"event: {event[0]}\ndata: {event[1]}\n\n".encode()
        finally:
            ctx.open_streams.discard(handle)
            ctx.engine.cancel(handle)

    return EventSourceResponse(guarded(), sep="\n", ping=15)


def stop_streams(ctx: ServerContext) -> None:
    """Shutdown begins (event loop): every open stream gets a failure it writes as an error
    event before it ends, rather than a cut connection."""
    for handle in list(ctx.open_streams):
        if not handle.done:
            handle.put(GenerationFailed(STOPPING_MESSAGE))


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(
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


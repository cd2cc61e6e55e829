"""Engine deltas -> OpenAI responses: whole (non-streaming) or as SSE chunk payloads."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..chat.output import OutputParser, ParsedDelta, ParserFactory
from ..engine.generation import Delta, GenerationFailed, GenerationHandle, TokenLogprob
from ..parsers.base import assemble_calls
from . import protocol as p
from .errors import error_body

DONE = "[DONE]"


@dataclass(frozen=True)
class ResponseMeta:
    id: str
    model: str
    fingerprint: str
    created: int = field(default_factory=lambda: int(time.time()))


def _top_entries(token: TokenLogprob) -> list[p.TopLogprob]:
    return [p.TopLogprob(token=t, logprob=lp, bytes=raw) for t, raw, lp in token.top]


def chat_logprobs(tokens: list[TokenLogprob]) -> p.ChoiceLogprobs:
    return p.ChoiceLogprobs(content=[
        p.TokenLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes,
                       top_logprobs=_top_entries(t))
        for t in tokens
    ])


def _finish_reason(reason: str | None, called_tools: bool) -> str | None:
    return "tool_calls" if reason == "stop" and called_tools else reason


@dataclass
class _ChatChoice:
    parser: OutputParser
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    tokens: int = 0

    def apply(self, delta: Delta) -> ParsedDelta:
        parsed = self.parser.feed(delta.text)
        if delta.finish_reason:
            tail = self.parser.finish()
            parsed = ParsedDelta(parsed.content + tail.content, parsed.reasoning + tail.reasoning,
                                 parsed.tool_calls + tail.tool_calls)
            self.finish_reason = delta.finish_reason
        self.content += parsed.content
        self.reasoning += parsed.reasoning
        self.tool_calls += parsed.tool_calls
        self.logprobs += delta.logprobs or []
        self.tokens += delta.num_tokens
        return parsed


def _usage(handle: GenerationHandle, completion_tokens: int) -> p.Usage:
    return p.make_usage(handle.prompt_tokens, completion_tokens, handle.cached_tokens)


async def collect_chat(
    handle: GenerationHandle, meta: ResponseMeta, parsers: ParserFactory
) -> p.ChatCompletion:
    choices = [_ChatChoice(parsers()) for _ in handle.specs]
    async for deltas in handle.deltas():
        for delta in deltas:
            choices[delta.choice].apply(delta)
    want_logprobs = handle.specs[0].logprobs is not None
    return p.ChatCompletion(
        id=meta.id, created=meta.created, model=meta.model, system_fingerprint=meta.fingerprint,
        choices=[
            p.ChatChoice(
                index=i,
                message=_chat_message(c),
                logprobs=chat_logprobs(c.logprobs) if want_logprobs else None,
                finish_reason=_finish_reason(c.finish_reason, bool(c.tool_calls)),
            )
            for i, c in enumerate(choices)
        ],
        usage=_usage(handle, sum(c.tokens for c in choices)),
    )


def _chat_message(choice: _ChatChoice) -> p.ChatMessageOut:
    message = p.ChatMessageOut(content=choice.content if choice.content or not choice.tool_calls
                               else None)
    if choice.reasoning:
        message.reasoning_content = choice.reasoning
    if choice.tool_calls:
        message.tool_calls = assemble_calls(choice.tool_calls)
    return message


async def stream_chat(
    handle: GenerationHandle, meta: ResponseMeta, parsers: ParserFactory, include_usage: bool
) -> AsyncIterator[str]:
    """SSE payloads: a role chunk per choice, content chunks, a finish chunk per choice,
    the usage chunk (empty choices) when asked for, then [DONE]."""
    choices = [_ChatChoice(parsers()) for _ in handle.specs]

    def chunk(choice_list: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> str:
        out = p.ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model,
                                    system_fingerprint=meta.fingerprint, choices=choice_list)
        if include_usage:
            out.usage = usage
        return json.dumps(out.wire(), separators=(",", ":"), ensure_ascii=False)

    def choice(index: int, delta: p.ChatDelta, logprobs: p.ChoiceLogprobs | None = None,
               finish: str | None = None) -> p.ChatChunkChoice:
        return p.ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)

    content_chunk = _TextChunks(lambda i, text: chunk([choice(i, p.ChatDelta(content=text))]))
    for i in range(len(choices)):
        yield chunk([choice(i, p.ChatDelta(role="assistant", content=""))])
    try:
        async for deltas in handle.deltas():
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
                    yield chunk([choice(delta.choice, p.ChatDelta(), finish=reason)])
    except GenerationFailed as exc:
        yield json.dumps(error_body(exc.status, str(exc), code="generation_failed"))
        return
    if include_usage:
        yield chunk([], _usage(handle, sum(c.tokens for c in choices)))
    yield DONE


class _TextChunks:
    """The hot path of streaming: a chunk that only carries text. Its JSON is rendered once
    per choice through the response models, around a marker, and reused with the text
    spliced in (pydantic per token costs more CPU than the engine spends per token)."""

    _MARKER = "\x00swan-text\x00"

    def __init__(self, render: Callable[[int, str], str]):
        self._render = render
        self._parts: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        parts = self._parts.get(index)
        if parts is None:
            marker = json.dumps(self._MARKER, ensure_ascii=False)
            head, _, tail = self._render(index, self._MARKER).partition(marker)
            parts = self._parts[index] = (head, tail)
        return parts[0] + json.dumps(text, ensure_ascii=False) + parts[1]


def _chat_delta(parsed: ParsedDelta) -> p.ChatDelta:
    delta = p.ChatDelta()
    if parsed.content:
        delta.content = parsed.content
    if parsed.reasoning:
        delta.reasoning_content = parsed.reasoning
    if parsed.tool_calls:
        delta.tool_calls = parsed.tool_calls
    return delta


# ---------------------------------------------------------------- text completions


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> p.CompletionLogprobs:
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.token)
    return p.CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[{text: lp for text, _, lp in t.top} for t in tokens],
        text_offset=offsets,
    )


async def collect_completion(handle: GenerationHandle, meta: ResponseMeta) -> p.Completion:
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
    return p.Completion(
        id=meta.id, created=meta.created, model=meta.model, system_fingerprint=meta.fingerprint,
        choices=[
            p.CompletionChoice(
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

    def chunk(choices: list[p.CompletionChoice], usage: p.Usage | None = None) -> str:
        out = p.Completion(id=meta.id, created=meta.created, model=meta.model,
                           system_fingerprint=meta.fingerprint, choices=choices)
        if include_usage:
            out.usage = usage
        return json.dumps(out.wire(), separators=(",", ":"), ensure_ascii=False)

    text_chunk = _TextChunks(lambda i, text: chunk([p.CompletionChoice(
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
                    yield chunk([p.CompletionChoice(index=d.choice, text=d.text,
                                                    logprobs=logprobs,
                                                    finish_reason=d.finish_reason)])
    except GenerationFailed as exc:
        yield json.dumps(error_body(exc.status, str(exc), code="generation_failed"))
        return
    if include_usage:
        yield chunk([], _usage(handle, tokens))
    yield DONE

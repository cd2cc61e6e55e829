"""What passes between the HTTP side and the generation thread (no MLX in here).

The HTTP side submits one SequenceSpec per choice and reads Deltas from a GenerationHandle.
The generation thread pushes Deltas with `loop.call_soon_threadsafe`; the reader merges
whatever piled up since it last looked, so a slow client costs one chunk, not one per token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SequenceSpec:
    """One choice to generate."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    # None: no logprobs; k >= 0: the chosen token's logprob plus the k most likely.
    logprobs: int | None = None
    choice: int = 0
    # Extra logits processors for this choice (e.g. constrained decoding), made on the
    # generation thread when the sequence joins the batch; processor(tokens, logits).
    processors: Callable[[], list[Any]] | None = None
    # An assistant turn of a chat: the conversation's next request will likely resend it
    # followed by the template's turn separator, which the server computes ahead when idle.
    chat_turn: bool = False


@dataclass(slots=True)
class TokenLogprob:
    token: str
    bytes: list[int]
    logprob: float
    # The most likely tokens at this step: (text, bytes, logprob), best first.
    top: list[tuple[str, list[int], float]]


@dataclass(slots=True)
class Delta:
    choice: int
    text: str
    num_tokens: int
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    # With finish_reason "stop": the stop string that ended the choice (None: a stop token).
    stop_string: str | None = None

    def merge(self, later: Delta) -> None:
        self.text += later.text
        self.num_tokens += later.num_tokens
        if later.logprobs:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.finish_reason = later.finish_reason
        self.stop_string = later.stop_string


class GenerationFailed(Exception):
    """The engine could not finish this request; the message is safe for the client."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status  # 503: the server as a whole is failing (a broken group)


@dataclass(eq=False)
class GenerationHandle:
    """The HTTP side's end of one request (all of its choices)."""

    request_id: str
    specs: list[SequenceSpec]
    prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    # Prompt tokens served from the prefix cache (see `note_cached`).
    cached_tokens: int = 0
    created: float = field(default_factory=time.monotonic)
    # Set on the event loop, read by the generation thread (a plain bool is enough).
    cancelled: bool = False
    # Every choice finished (set on the event loop when the last delta is read).
    done: bool = False
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _cached_by_prompt: dict[int, int] = field(default_factory=dict)

    def note_cached(self, prompt_id: int, tokens: int) -> None:
        """Generation thread: one choice of prompt `prompt_id` started from `tokens` cached
        tokens. Usage counts each prompt once, so a prompt whose choices started from
        different prefixes reports the fewest, the tokens every one of them was spared."""
        known = self._cached_by_prompt.get(prompt_id)
        self._cached_by_prompt[prompt_id] = tokens if known is None else min(known, tokens)
        self.cached_tokens = sum(self._cached_by_prompt.values())

    def put(self, item: list[Delta] | GenerationFailed) -> None:
        """Event-loop side; the generation thread goes through `deliver_threadsafe`."""
        self._queue.put_nowait(item)

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """Yields merged deltas (at most one per choice) until every choice has finished."""
        open_choices = len(self.specs)
        while open_choices:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            merged: dict[int, Delta] = {}
            for item in items:
                if isinstance(item, GenerationFailed):
                    raise item
                for delta in item:
                    if delta.choice in merged:
                        merged[delta.choice].merge(delta)
                    else:
                        merged[delta.choice] = delta
            open_choices -= sum(1 for d in merged.values() if d.finish_reason)
            self.done = open_choices == 0
            yield list(merged.values())


def _put_all(items: list[tuple[GenerationHandle, list[Delta] | GenerationFailed]]) -> None:
    for handle, item in items:
        handle.put(item)


def deliver_threadsafe(
    loop: asyncio.AbstractEventLoop,
    items: list[tuple[GenerationHandle, list[Delta] | GenerationFailed]],
) -> None:
    """Hands one engine step's output to the event loop in a single wake-up."""
    if items:
        loop.call_soon_threadsafe(_put_all, items)

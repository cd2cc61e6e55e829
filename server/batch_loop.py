"""The generation thread's loop: continuous batching on mlx_lm's BatchGenerator.

Each turn: read the inbox (new requests, cancellations), move waiting sequences into the
running batch while there are free slots, run one BatchGenerator step (one decode token
for every running sequence plus one prefill chunk for those still reading their prompt),
turn tokens into text deltas and hand them to the event loop in one wake-up.

BatchGenerator already does what this needs: per-sequence samplers, logits processors,
max_tokens and stop tokens, inserting sequences mid-flight and removing them at any stage
(queued, prefilling, decoding). Text stop strings, logprobs and cancellation live here.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from .generation import (
    Delta,
    GenerationFailed,
    GenerationHandle,
    SequenceSpec,
    TokenLogprob,
    deliver_threadsafe,
)
from .model_loading import LoadedModel
from .sampling import make_logits_processors, make_sampler
from .textstream import IncrementalDecoder, SequenceText
from .token_text import TokenText

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("swan_serve.engine")

_PREFILL_BATCH = 8
# Prompt tokens the incremental decoder starts from (context for the first token's text).
_DECODE_CONTEXT = 4


@dataclass(eq=False)
class _Sequence:
    handle: GenerationHandle
    spec: SequenceSpec
    text: SequenceText
    uid: int = -1
    tokens: int = 0
    first_token_at: float = 0.0


class BatchLoop:
    def __init__(
        self,
        loaded: LoadedModel,
        engine: Engine,
        inbox: queue.SimpleQueue,
        loop: asyncio.AbstractEventLoop,
    ):
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._vocab_size = loaded.vocab_size
        self._engine = engine
        self._settings = engine.settings
        self._metrics = engine.metrics
        self._inbox = inbox
        self._loop = loop
        self._stream = mx.new_stream(mx.default_device())
        self._waiting: deque[_Sequence] = deque()
        self._active: dict[int, _Sequence] = {}
        self._token_text = TokenText(self._tokenizer)
        self._generator = self._new_generator()

    def _new_generator(self) -> BatchGenerator:
        slots = self._settings.max_concurrency
        return BatchGenerator(
            self._model,
            stop_tokens=[[t] for t in sorted(self._tokenizer.eos_token_ids)],
            completion_batch_size=slots,
            prefill_batch_size=min(_PREFILL_BATCH, slots),
            prefill_step_size=self._settings.prefill_step_size,
            stream=self._stream,
        )

    # ------------------------------------------------------------ main loop

    def run(self) -> None:
        while self._read_inbox(block=not (self._waiting or self._active)):
            self._admit()
            if self._active:
                self._step()
            self._engine.active_count = len(self._active)
            self._engine.waiting_count = len(self._waiting)
        self.fail_all("The server is shutting down.")

    def _read_inbox(self, block: bool) -> bool:
        """Applies pending messages; False once asked to stop."""
        try:
            message = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, handle = message
            if kind == "stop":
                return False
            if kind == "submit":
                self._enqueue(handle)
            elif kind == "cancel":
                self._cancel(handle)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _enqueue(self, handle: GenerationHandle) -> None:
        if handle.cancelled:  # gave up before we saw it
            self._engine.admission.release(len(handle.specs))
            return
        for spec in handle.specs:
            decoder = IncrementalDecoder(self._tokenizer, spec.prompt[-_DECODE_CONTEXT:])
            text = SequenceText(decoder, spec.stop)
            self._waiting.append(_Sequence(handle, spec, text))

    def _admit(self) -> None:
        free = self._settings.max_concurrency - len(self._active)
        batch = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        if not batch:
            return
        try:
            with mx.stream(self._stream):
                uids = self._generator.insert(
                    [s.spec.prompt for s in batch],
                    max_tokens=[s.spec.max_tokens for s in batch],
                    caches=self._cached_prefixes(batch),
                    samplers=[make_sampler(s.spec.sampling, s.spec.choice, self._vocab_size)
                              for s in batch],
                    logits_processors=[self._processors(s.spec) for s in batch],
                )
        except Exception:  # these requests cannot start; the running batch is untouched
            log.exception("could not start %d sequences", len(batch))
            self._engine.admission.release(len(batch))
            handles = list(dict.fromkeys(s.handle for s in batch))
            self._deliver([(h, GenerationFailed("The request could not be started."))
                           for h in handles])
            return
        for seq, uid in zip(batch, uids, strict=True):
            seq.uid = uid
            self._active[uid] = seq
            self._metrics.count_prompt(len(seq.spec.prompt), cached_tokens=0)

    @staticmethod
    def _processors(spec: SequenceSpec) -> list[Any]:
        processors = make_logits_processors(spec.sampling, len(spec.prompt))
        return processors + (spec.processors() if spec.processors else [])

    def _cached_prefixes(self, batch: list[_Sequence]) -> list[Any] | None:
        """Seam for the prefix cache: KV caches covering each prompt's known prefix.

        None = every prompt is prefilled from scratch (cached_tokens stays 0). When this
        returns caches, `insert` also needs the matching `all_tokens` prefixes.
        """
        return None

    def _step(self) -> None:
        try:
            _, responses = self._generator.next()
        except Exception:
            log.exception("a generation step failed; failing the running requests")
            self.fail_all("Generation failed on the server.")
            return
        now = time.monotonic()
        outgoing: dict[GenerationHandle, list[Delta]] = {}
        stopped_early: list[int] = []
        ended: list[tuple[_Sequence, str]] = []
        for response in responses:
            seq = self._active.get(response.uid)
            if seq is None:
                continue
            delta = self._advance(seq, response, now)
            outgoing.setdefault(seq.handle, []).append(delta)
            if delta.finish_reason:
                ended.append((seq, delta.finish_reason))
                if response.finish_reason is None:  # a stop string, not a stop token
                    stopped_early.append(response.uid)
        if stopped_early:
            self._generator.remove(stopped_early)
        for seq, reason in ended:
            self._retire(seq, reason, now)
        self._metrics.count_tokens(len(responses))
        self._deliver(list(outgoing.items()))

    def _advance(self, seq: _Sequence, response: Any, now: float) -> Delta:
        token = response.token
        seq.tokens += 1
        if seq.tokens == 1:
            seq.first_token_at = now
            self._metrics.first_token(now - seq.handle.created)
        if response.finish_reason == "stop":  # an end-of-sequence token: not text
            text, _ = seq.text.finish(None)
            return Delta(seq.spec.choice, text, 1, None, "stop")
        if response.finish_reason == "length":
            text, stopped = seq.text.finish(token)
            finish: str | None = "stop" if stopped else "length"
        else:
            text, stopped = seq.text.add(token)
            finish = "stop" if stopped else None
        logprobs = None
        if seq.spec.logprobs is not None:
            logprobs = [self._token_logprob(response.logprobs, token, seq.spec.logprobs)]
        return Delta(seq.spec.choice, text, 1, logprobs, finish)

    def _token_logprob(self, row: mx.array, token: int, top: int) -> TokenLogprob:
        alternatives: list[tuple[str, list[int], float]] = []
        if top > 0:
            ids = mx.argpartition(-row, kth=top - 1)[:top]
            pairs = sorted(zip(ids.tolist(), row[ids].tolist(), strict=True),
                           key=lambda pair: -pair[1])
            alternatives = [(*self._token_text(i), lp) for i, lp in pairs]
        text, raw = self._token_text(token)
        return TokenLogprob(text, raw, row[token].item(), alternatives)

    # ------------------------------------------------------------ endings

    def _cancel(self, handle: GenerationHandle) -> None:
        now = time.monotonic()
        waiting = [s for s in self._waiting if s.handle is handle]
        if waiting:
            self._waiting = deque(s for s in self._waiting if s.handle is not handle)
            self._engine.admission.release(len(waiting))
        running = [s for s in self._active.values() if s.handle is handle]
        if running:
            self._generator.remove([s.uid for s in running])
            for seq in running:
                self._retire(seq, "cancelled", now)

    def _retire(self, seq: _Sequence, reason: str, now: float) -> None:
        del self._active[seq.uid]
        self._engine.admission.release()
        decode_time = now - seq.first_token_at if seq.tokens else 0.0
        self._metrics.sequence_finished(reason, now - seq.handle.created, decode_time,
                                        seq.tokens)

    def fail_all(self, message: str) -> None:
        """Ends every queued and running sequence with an error (and starts a fresh batch)."""
        handles = {s.handle for s in self._waiting} | {s.handle for s in self._active.values()}
        self._engine.admission.release(len(self._waiting) + len(self._active))
        self._waiting.clear()
        self._active.clear()
        self._generator.close()
        self._generator = self._new_generator()
        self._deliver([(h, GenerationFailed(message)) for h in handles])

    def _deliver(self, items: list[tuple[GenerationHandle, Any]]) -> None:
        try:
            deliver_threadsafe(self._loop, items)
        except RuntimeError:  # the event loop is closed: the server is going away
            pass

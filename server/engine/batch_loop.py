"""The generation thread's loop: continuous batching on mlx_lm's BatchGenerator.

Each turn: read the inbox (new requests, cancellations), move waiting sequences into the
running batch while there are free slots, run one BatchGenerator step (one decode token
for every running sequence plus one prefill chunk for those still reading their prompt),
turn tokens into text deltas and hand them to the event loop in one wake-up.

BatchGenerator already does what this needs: per-sequence samplers, logits processors,
max_tokens and stop tokens, inserting sequences mid-flight and removing them at any stage
(queued, prefilling, decoding). Text stop strings, logprobs and cancellation live here,
and the prefix cache's side of it (prefix_reuse.py): each sequence starts from the longest
cached prefix of its prompt, and the states it computes are saved at segment ends and when
it ends.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from ..chat.prompts import turn_separator
from ..chat.textstream import IncrementalDecoder, SequenceText
from ..chat.token_text import TokenText
from ..prefix.kv_state import free_memory_bytes
from ..prefix.lookahead import TurnLookahead
from ..prefix.prefix_cache import Entry
from ..prefix.prefix_reuse import Plan, PrefixReuse
from ..prefix.prefix_store import DiskTier, model_key
from .generation import (
    Delta,
    GenerationFailed,
    GenerationHandle,
    SequenceSpec,
    TokenLogprob,
    deliver_threadsafe,
)
from .kv_memory import BatchMemory, default_budget
from .model_loading import LoadedModel
from .prefill_schedule import PrefillScheduler
from .prompt_batch import use_moving_prompt_batch
from .sampling import make_logits_processors, make_sampler
from .step_costs import PrefillWork

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("swan_serve.engine")

# The most sequences that prefill together; prefill_schedule.py picks fewer when that
# gets first tokens out sooner on this device.
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
    plan: Plan | None = None
    kv_bytes: int = 0  # reserved at submission (engine.kv_need)

    @property
    def reach(self) -> int:
        """The most positions its cache can hold: prompt and every token it may write."""
        return len(self.spec.prompt) + self.spec.max_tokens


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
        # How long an idle loop waits for a message (None: until one comes).
        self._idle_wait: float | None = None
        kv_budget = self._kv_budget()
        prefix_cap = self._prefix_budget(kv_budget)
        self._prefixes = PrefixReuse(
            prefix_cap,
            turn_ends=self._tokenizer.eos_token_ids,
            on_evict=self._evicted,
        )
        self._memory = BatchMemory(engine.kv_layout, self._model, kv_budget, prefix_cap,
                                   self._prefixes.cache,
                                   lambda: [s.reach for s in self._active.values()])
        log.info("prefix cache: up to %.1f MiB", prefix_cap / 2**20)
        self._prefill = PrefillScheduler(cap=min(_PREFILL_BATCH, self._settings.max_concurrency),
                                         chunk=self._settings.prefill_step_size)
        self._disk = self._open_disk_tier(loaded)
        self._prefixes.lower = self._disk
        self._lookahead = TurnLookahead(self._model, turn_separator(self._tokenizer),
                                        self._prefixes, self._stream,
                                        limit=self._settings.max_concurrency,
                                        on_computed=self._metrics.count_lookahead)
        self._generator = self._new_generator()
        self._publish()

    def _new_generator(self) -> BatchGenerator:
        slots = self._settings.max_concurrency
        generator = BatchGenerator(
            self._model,
            stop_tokens=[[t] for t in sorted(self._tokenizer.eos_token_ids)],
            completion_batch_size=slots,
            prefill_batch_size=self._prefill.cap,
            prefill_step_size=self._settings.prefill_step_size,
            stream=self._stream,
        )
        use_moving_prompt_batch(generator)
        return generator

    # ------------------------------------------------------------ main loop

    def run(self) -> None:
        while self._read_inbox(block=not (self._waiting or self._active
                                          or self._lookahead.pending)):
            self._admit()
            if self._active:
                self._step()
            elif not self._waiting and self._lookahead.pending:
                self._lookahead.compute_one()  # idle: the next turn's first tokens
            self._memory.settle()
            self._publish()
        self.fail_all("The server is shutting down.")
        self._spill_memory()

    def _publish(self) -> None:
        """The counts /metrics reads."""
        engine = self._engine
        engine.active_count = len(self._active)
        engine.waiting_count = len(self._waiting)
        engine.kv_batch_bytes = self._generator.prompt_cache_nbytes
        engine.prefix_cache_bytes = self._prefixes.cache.bytes_held
        engine.prefix_cache_entries = len(self._prefixes.cache)
        if self._disk is not None:
            engine.prefix_disk_bytes = self._disk.bytes_held
            engine.prefix_disk_entries = len(self._disk)

    # ------------------------------------------------------------ hooks (distributed.py)

    def _kv_budget(self) -> int:
        """Memory for every KV cache: the running batch's and the prefix cache's."""
        return self._engine.admission.kv_budget or default_budget(free_memory_bytes())

    def _prefix_budget(self, kv_budget: int) -> int:
        """The prefix cache's own cap (it also gives way to the running batch)."""
        cap = self._settings.prefix_cache_bytes
        return kv_budget if cap is None else min(cap, kv_budget)

    def _agree_take(self, take: int) -> int:
        """The prefill group size every rank uses (a timing- and memory-based choice)."""
        return take

    def _sampler(self, spec: SequenceSpec) -> Any:
        return make_sampler(spec.sampling, spec.choice, self._vocab_size)

    def _step_failed(self) -> None:
        self.fail_all("Generation failed on the server.")

    def _saved_prefixes_folder(self, loaded: LoadedModel) -> Path | None:
        """Where the prefix cache's disk tier lives (None: memory only)."""
        root = self._settings.prefix_cache_dir
        if (root is None or not self._prefixes.enabled or self._engine.model_dir is None
                or not self._settings.prefix_cache_disk_bytes):
            return None
        layout = self._memory.layout
        kv = f"{layout.bits}-bit/{layout.group_size}" if layout.bits else "float"
        return root / model_key(self._engine.model_dir, loaded.compute_dtype, kv)

    # ------------------------------------------------------------ prefix cache on disk

    def _open_disk_tier(self, loaded: LoadedModel) -> DiskTier | None:
        folder = self._saved_prefixes_folder(loaded)
        if folder is None:
            return None
        disk = DiskTier(folder, self._settings.prefix_cache_disk_bytes, self._recompute_cost,
                        on_load=self._metrics.prefix_load)
        try:
            entries, skipped = disk.scan()
        except OSError:
            log.exception("prefix cache: cannot use %s; keeping prefixes in memory only",
                          folder)
            return None
        log.info("prefix cache: %d states (%.1f MiB) on disk in %s%s", entries,
                 disk.bytes_held / 2**20, folder,
                 f", {skipped} incomplete ones deleted" if skipped else "")
        return disk

    def _recompute_cost(self, tokens: int, context: int) -> float | None:
        costs = self._prefill.costs
        return costs.prefill_cost(PrefillWork(tokens, context)) if costs.ready else None

    def _evicted(self, entry: Entry) -> None:
        self._metrics.count_prefix_eviction()
        self._spill(entry)

    def _spill(self, entry: Entry) -> None:
        if self._disk is None:
            return
        try:
            if self._disk.spill(entry):
                self._metrics.count_prefix_spill()
        except Exception:  # a full or failing disk costs the state, not the server
            log.exception("prefix cache: could not write a state to %s", self._disk.folder)

    def _spill_memory(self) -> None:
        """At shutdown: what memory holds and disk does not (incremental, oldest first)."""
        for entry in self._prefixes.cache.entries():
            self._spill(entry)

    def _read_inbox(self, block: bool) -> bool:
        """Applies pending messages; False once asked to stop."""
        try:
            message = (self._inbox.get(timeout=self._idle_wait) if block
                       else self._inbox.get_nowait())
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

    def _enqueue(self, handle: GenerationHandle) -> bool:
        """Queues the handle's sequences; False if it was cancelled before we saw it."""
        if handle.cancelled:
            self._engine.admission.release(
                len(handle.specs), sum(self._engine.kv_need(s) for s in handle.specs))
            return False
        for spec in handle.specs:
            decoder = IncrementalDecoder(self._tokenizer, spec.prompt[-_DECODE_CONTEXT:])
            text = SequenceText(decoder, spec.stop)
            self._waiting.append(_Sequence(handle, spec, text,
                                           kv_bytes=self._engine.kv_need(spec)))
        return True

    def _release(self, seqs: list[_Sequence]) -> None:
        self._engine.admission.release(len(seqs), sum(s.kv_bytes for s in seqs))

    def _admit(self) -> None:
        free = self._settings.max_concurrency - len(self._active)
        if free <= 0 or not self._waiting or not self._prefill.may_start():
            return
        candidates = list(itertools.islice(self._waiting, free))
        if len(candidates) == 1 and not self._prefill.busy:
            take = 1  # nothing to weigh: skip costing the prompt (a prefix-cache lookup)
        else:
            take = self._prefill.how_many(
                [self._prefill_work(s) for s in candidates], decode_rows=len(self._active))
        # Every rank takes what rank 0 decided: timing and memory are its own readings.
        take = self._agree_take(self._memory.fitting(candidates[:take]))
        if not take:
            return  # the batch's caches would not fit: wait for running sequences to end
        log.debug("prefill: starting %d of %d waiting (%d running)", take, len(self._waiting),
                  len(self._active))
        batch: list[_Sequence] = []
        deferred: list[_Sequence] = []
        while self._waiting and len(batch) < take:
            seq = self._waiting.popleft()
            seq.plan = self._prefixes.plan(seq.spec.prompt)
            # None: another sequence is about to cache a longer prefix of this prompt.
            (batch if seq.plan is not None else deferred).append(seq)
        self._waiting.extendleft(reversed(deferred))
        if not batch:
            return
        plans = [s.plan for s in batch if s.plan is not None]
        try:
            with mx.stream(self._stream):
                uids = self._generator.insert_segments(
                    [p.segments for p in plans],
                    max_tokens=[s.spec.max_tokens for s in batch],
                    caches=[p.state or self._memory.new_cache() for p in plans],
                    all_tokens=[p.all_tokens for p in plans],
                    samplers=[self._sampler(s.spec) for s in batch],
                    logits_processors=[self._processors(s.spec) for s in batch],
                )
        except Exception:  # these requests cannot start; the running batch is untouched
            log.exception("could not start %d sequences", len(batch))
            for plan in plans:
                self._prefixes.abandon(plan)
            self._release(batch)
            handles = list(dict.fromkeys(s.handle for s in batch))
            self._deliver([(h, GenerationFailed("The request could not be started."))
                           for h in handles])
            return
        for seq, plan, uid in zip(batch, plans, uids, strict=True):
            seq.uid = uid
            self._active[uid] = seq
            self._prefill.started(uid, plan.cached, len(seq.spec.prompt))
            seq.handle.note_cached(id(seq.spec.prompt), plan.cached)
            self._metrics.count_prompt(len(seq.spec.prompt), cached_tokens=plan.cached,
                                       tier=plan.source)

    def _prefill_work(self, seq: _Sequence) -> PrefillWork:
        """What starting `seq` now would compute before its last token."""
        cached = self._prefixes.cached_length(seq.spec.prompt)
        return PrefillWork(len(seq.spec.prompt) - 1 - cached, cached)

    @staticmethod
    def _processors(spec: SequenceSpec) -> list[Any]:
        processors = make_logits_processors(spec.sampling, len(spec.prompt))
        return processors + (spec.processors() if spec.processors else [])

    def _step(self) -> None:
        started = time.monotonic()
        try:
            prompt_responses, responses = self._generator.next()
        except Exception:
            log.exception("a generation step failed; failing the running requests")
            self._step_failed()
            return
        now = time.monotonic()
        self._prefill.step_done(now - started, len(responses), prompt_responses)
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
                else:
                    entry = self._save_final(seq, response.prompt_cache, response.all_tokens)
                    if seq.spec.chat_turn:
                        self._lookahead.turn_ended(entry, response.finish_reason,
                                                   response.token)
        if stopped_early:
            self._remove_saving([self._active[uid] for uid in stopped_early])
        self._save_boundaries(prompt_responses)
        for seq, reason in ended:
            self._retire(seq, reason, now)
        self._metrics.count_tokens(len(responses))
        self._deliver(list(outgoing.items()))

    def _save_boundaries(self, prompt_responses: list[Any]) -> None:
        """Saves the states of sequences whose prompt reached a segment end this step."""
        uids = [r.uid for r in prompt_responses
                if r.end_of_segment and not r.end_of_prompt and r.uid in self._active]
        if not uids:
            return
        with mx.stream(self._stream):  # copies queue behind the step that computed them
            for uid, (cache, tokens) in self._extract(uids).items():
                plan = self._active[uid].plan
                if plan is not None:
                    self._prefixes.reached(plan, cache, list(tokens))

    def _extract(self, uids: list[int]) -> dict[int, tuple[Any, list[int]]]:
        """The sequences' caches and the tokens they cover; {} if that fails (the prefix
        cache is an optimisation: it never stops a step)."""
        try:
            return self._generator.extract_cache(uids)
        except Exception:
            log.exception("could not copy the caches of %d sequences", len(uids))
            return {}

    def _save_final(self, seq: _Sequence, cache: Any, tokens: list[int] | None
                    ) -> Entry | None:
        if seq.plan is None:
            return None
        with mx.stream(self._stream):
            return self._prefixes.finished(seq.plan, cache, list(tokens) if tokens else None)

    def _remove_saving(self, seqs: list[_Sequence]) -> None:
        """Takes sequences out of the batch, keeping what they computed in the cache."""
        with mx.stream(self._stream):
            caches = self._extract([s.uid for s in seqs])
        self._generator.remove([s.uid for s in seqs])
        for seq in seqs:
            cache, tokens = caches.get(seq.uid, (None, None))
            self._save_final(seq, cache, tokens)

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
        return Delta(seq.spec.choice, text, 1, logprobs, finish,
                     seq.text.stop_string if stopped else None)

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
            self._release(waiting)
        running = [s for s in self._active.values() if s.handle is handle]
        if running:
            self._remove_saving(running)
            for seq in running:
                self._retire(seq, "cancelled", now)

    def _retire(self, seq: _Sequence, reason: str, now: float) -> None:
        del self._active[seq.uid]
        self._prefill.ended(seq.uid)
        if seq.plan is not None:
            self._prefixes.abandon(seq.plan)
        self._release([seq])
        decode_time = now - seq.first_token_at if seq.tokens else 0.0
        self._metrics.sequence_finished(reason, now - seq.handle.created, decode_time,
                                        seq.tokens)

    def fail_all(self, message: str) -> None:
        """Ends every queued and running sequence with an error (and starts a fresh batch)."""
        handles = {s.handle for s in self._waiting} | {s.handle for s in self._active.values()}
        for seq in self._active.values():
            self._prefill.ended(seq.uid)
            if seq.plan is not None:
                self._prefixes.abandon(seq.plan)
        self._release(list(self._waiting) + list(self._active.values()))
        self._waiting.clear()
        self._active.clear()
        self._generator.close()
        self._generator = self._new_generator()
        self._deliver([(h, GenerationFailed(message)) for h in handles])

    def fail_handles(self, failure: GenerationFailed) -> None:
        """Any thread, once this loop is stuck for good: every request it holds gets
        `failure` (its state is not touched)."""
        handles = {s.handle for s in list(self._waiting)}
        handles |= {s.handle for s in list(self._active.values())}
        self._deliver([(h, failure) for h in handles])

    def _deliver(self, items: list[tuple[GenerationHandle, Any]]) -> None:
        try:
            deliver_threadsafe(self._loop, items)
        except RuntimeError:  # the event loop is closed: the server is going away
            pass


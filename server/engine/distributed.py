"""One model served by several processes (machines) on mlx.distributed, in lockstep.

Under `mlx.launch`, every rank runs `swan-serve MODEL --parallel tensor|pipeline`:

- every rank resolves the same MODEL and, on a first load, quantizes all of it on its own
  machine under that machine's cache lock (two ranks on one machine convert it once).
  The build is deterministic (the same checkpoint and recipe give a byte-identical
  manifest and plan), so every machine gets the same checkpoint without gigabytes
  crossing the link. Each rank does not convert only its own part: a tensor-parallel
  shard cuts through every matrix, and the cache keeps one whole, standard MLX checkpoint
  that any number of ranks, a single server or stock mlx_lm can load. Before serving,
  the ranks compare a hash of the config, the plan, the weight files (headers and sampled
  bytes) and the serving settings; a mismatch stops every rank with one line.
- mlx_lm shards the model (`model.shard(group)` for tensor parallelism,
  `model.model.pipeline(group)` for pipeline parallelism): each rank holds about 1/N of
  the weights and of every KV cache, prefix-cache states included.
- rank 0 alone listens for HTTP and runs the scheduler and the prefix cache's
  bookkeeping. Its generation thread (LeaderLoop) sends, once per loop turn, what it did
  to the batch: requests started (prompt tokens, sampling parameters, stop strings),
  cancellations, the prefill group size it chose (and once, the prefix-cache budget
  every rank can hold). Every other rank (FollowerLoop) replays those decisions through
  the same BatchLoop code, so all run the same BatchGenerator steps, make the same
  prefix-cache plans and saves, and evict the same states. Rank 0 sends the sampled
  tokens inside each step (collectives.BroadcastSampler): only rank 0 runs grammar
  constraints and penalties.
- a rank that dies breaks the ring at once (mlx raises on the others); one that stops
  answering is caught by a step watchdog. Either way rank 0 answers 503 and every rank
  exits non-zero with one line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_lm.models.cache import make_prompt_cache

from .batch_loop import BatchLoop
from .collectives import BroadcastSampler, GroupFailed, ReceivedSampler
from .generation import GenerationHandle, SamplingParams, SequenceSpec
from .group import HEARTBEAT_SECONDS, MEMORY_REPORT_SECONDS, Distributed, Watchdog

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("swan_serve.distributed")


# ------------------------------------------------------------------ the loops


def _spec_message(spec: SequenceSpec) -> dict[str, Any]:
    sampling = spec.sampling
    return {"prompt": spec.prompt, "max_tokens": spec.max_tokens, "stop": list(spec.stop),
            "choice": spec.choice, "chat_turn": spec.chat_turn,
            "sampling": {**vars(sampling), "logit_bias": [list(p) for p in sampling.logit_bias]}}


def _spec_from(message: dict[str, Any]) -> SequenceSpec:
    sampling = dict(message["sampling"])
    sampling["logit_bias"] = tuple(tuple(p) for p in sampling["logit_bias"])
    return SequenceSpec(prompt=message["prompt"], max_tokens=message["max_tokens"],
                        sampling=SamplingParams(**sampling), stop=tuple(message["stop"]),
                        choice=message["choice"], chat_turn=message["chat_turn"])


# A loop turn in which rank 0 started, cancelled and asked nothing.
_NOTHING: dict[str, Any] = {"ops": [], "stop": False}


class _LockstepLoop(BatchLoop):
    """What both sides change in BatchLoop: the budget all ranks can hold, no saved
    prefix cache (each rank's states are its own shard), a watchdog, and fatal errors."""

    _dist: Distributed

    def __init__(self, loaded: Any, engine: Engine, inbox: Any, loop: Any):
        assert engine.distributed is not None
        self._dist = engine.distributed
        self._group = self._dist.collectives.group
        self._watchdog = Watchdog(self._dist.step_timeout, self._dist.fatal)
        super().__init__(loaded, engine, inbox, loop)
        self._dist.collectives.stream = self._stream

    def _kv_budget(self) -> int:
        """The smallest rank's: each holds its shard of every cache, and rank 0's
        admission (429s, the group it starts) must fit on every one."""
        mine = super()._kv_budget()
        agreed = min(row[0] for row in self._dist.collectives.gather_ints([mine >> 10])) << 10
        self._engine.admission.kv_budget = agreed
        return agreed

    def _prefix_budget(self, kv_budget: int) -> int:
        """Every rank holds its shard of every cached state, and evicts by its own byte
        counts: those agree when every rank holds the same kinds of layer cache (always
        by tensor; by pipeline when the layers split evenly), else the cache stays off."""
        collectives = self._dist.collectives
        layout = ",".join(type(c).__name__ for c in make_prompt_cache(self._model))
        if len(set(collectives.digests(layout))) > 1:
            log.warning("prefix cache off: the ranks hold different mixes of layers")
            return 0
        mine = super()._prefix_budget(kv_budget)
        return min(row[0] for row in collectives.gather_ints([mine >> 10])) << 10

    def _saved_prefixes_folder(self, loaded: Any) -> Path | None:
        if self._settings.prefix_cache_dir is not None:
            log.warning("the prefix cache is not saved across restarts when serving on "
                        "several ranks (each holds only its shard of every state)")
        return None

    def _step_failed(self) -> None:
        raise GroupFailed("a generation step failed; the ranks can no longer stay in step")

    def _turn_done(self, turn: dict[str, Any]) -> None:
        self._watchdog.beat()
        if turn.get("memory"):
            self._dist.report_memory()

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            log.debug("lockstep ended", exc_info=True)
            self._dist.fatal(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


class LeaderLoop(_LockstepLoop):
    """Rank 0: BatchLoop as on one machine, telling the other ranks what it decides."""

    def __init__(self, *args: Any):
        self._ops: list[list[Any]] = []
        self._ids: weakref.WeakKeyDictionary[GenerationHandle, int] = weakref.WeakKeyDictionary()
        self._next_id = 0
        self._greedy: BroadcastSampler | None = None
        self._memory_at = 0.0
        super().__init__(*args)
        self._idle_wait = HEARTBEAT_SECONDS

    def _read_inbox(self, block: bool) -> bool:
        self._ops = []
        going_on = super()._read_inbox(block)
        turn: dict[str, Any] = {"ops": self._ops, "stop": not going_on}
        if time.monotonic() - self._memory_at > MEMORY_REPORT_SECONDS:
            self._memory_at = time.monotonic()
            turn["memory"] = True
        # Most turns (every decode step) have nothing to say: one collective, not two.
        self._dist.collectives.broadcast(turn if turn != _NOTHING else None)
        self._turn_done(turn)
        return going_on

    def _enqueue(self, handle: GenerationHandle) -> bool:
        if not super()._enqueue(handle):
            return False
        self._ids[handle] = self._next_id
        self._ops.append(["submit", self._next_id, [_spec_message(s) for s in handle.specs]])
        self._next_id += 1
        return True

    def _cancel(self, handle: GenerationHandle) -> None:
        if handle in self._ids:
            self._ops.append(["cancel", self._ids[handle]])
        super()._cancel(handle)

    def _agree_take(self, take: int) -> int:
        return self._dist.collectives.broadcast(take)

    def _sampler(self, spec: SequenceSpec) -> Any:
        sampler = super()._sampler(spec)
        if spec.sampling.temperature != 0:
            return BroadcastSampler(sampler, self._group)
        # Greedy sequences share one sampler object: mlx-lm then samples them in one call.
        if self._greedy is None:
            self._greedy = BroadcastSampler(sampler, self._group)
        return self._greedy


class FollowerLoop(_LockstepLoop):
    """Ranks 1..N-1: the same BatchLoop, driven by rank 0's decisions instead of HTTP."""

    def __init__(self, *args: Any):
        self._handles: weakref.WeakValueDictionary[int, GenerationHandle] = (
            weakref.WeakValueDictionary())
        self._greedy_received: ReceivedSampler | None = None
        self._asyncio_loop = args[3]
        super().__init__(*args)

    def _read_inbox(self, block: bool) -> bool:
        turn = self._dist.collectives.broadcast() or _NOTHING
        for op in turn["ops"]:
            if op[0] == "submit":
                specs = [_spec_from(m) for m in op[2]]
                handle = GenerationHandle(f"rank0-{op[1]}", specs, 0, self._asyncio_loop)
                self._handles[op[1]] = handle
                self._enqueue(handle)
            elif op[0] == "cancel" and op[1] in self._handles:
                self._cancel(self._handles[op[1]])
        self._turn_done(turn)
        return not turn["stop"]

    def _agree_take(self, take: int) -> int:
        return self._dist.collectives.broadcast()

    def _sampler(self, spec: SequenceSpec) -> Any:
        if spec.sampling.temperature != 0:
            return ReceivedSampler(self._group)
        if self._greedy_received is None:
            self._greedy_received = ReceivedSampler(self._group)
        return self._greedy_received

    def _processors(self, spec: SequenceSpec) -> list[Any]:
        return []  # rank 0 applies them; its tokens arrive through the sampler

    def _deliver(self, items: list[tuple[GenerationHandle, Any]]) -> None:
        pass  # nobody listens here: rank 0 answers the clients


# ------------------------------------------------------------------ ranks 1..N-1


def run_follower(engine: Engine) -> int:
    """Runs a follower rank's engine on this thread until rank 0 stops; the exit status.

    Ctrl-C reaches every rank of the launcher's session: a follower leaves the stop to
    rank 0 (which tells it, so that no collective is left half-entered) and exits on its
    own only if that has not happened within _INTERRUPT_GRACE_SECONDS."""
    signal.signal(signal.SIGINT, _exit_later)
    failures: list[str] = []
    engine.run_here(asyncio.new_event_loop(), on_failure=failures.append)
    if failures:
        assert engine.distributed is not None
        engine.distributed.fatal(failures[0])
    return 0


_INTERRUPT_GRACE_SECONDS = 10.0


def _exit_later(_signum: int, _frame: Any) -> None:
    def leave() -> None:
        time.sleep(_INTERRUPT_GRACE_SECONDS)
        print("swan-serve: interrupted; rank 0 did not stop the group", file=sys.stderr,
              flush=True)
        os._exit(130)

    threading.Thread(target=leave, daemon=True).start()

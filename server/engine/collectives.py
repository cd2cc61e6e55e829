"""The few things the ranks of a distributed server say to each other, on mlx.distributed.

Every exchange is a collective that all ranks enter in the same order (the lockstep of
distributed.py guarantees it); rank 0 is the only one with something to say, the others
add zeros. Control messages are JSON (plain data: never code from another machine), sent
as two all_sums: their length, then their bytes. They run on the generation thread's
stream once it exists (`stream`): the batch's steps evaluate asynchronously, and two
collectives in flight on different streams could meet the other ranks' in another order.
No device is named: the backend (ring, JACCL, MPI, NCCL) decides where collectives run, as
it does for mlx_lm's sharded models.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import mlx.core as mx
import numpy as np


class GroupFailed(RuntimeError):
    """The group cannot go on; the message is one line written for the user."""


class Collectives:
    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self._lock = threading.Lock()
        # Bytes this rank put into all_sums (its control messages, the sampled tokens and
        # the model's own sharded layers alike): see count_all_sums.
        self.bytes_sent = 0
        self.collectives = 0
        self.stream: Any = None  # the generation thread's stream, once it exists

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_sent += nbytes
            self.collectives += 1

    # ------------------------------------------------------------ messages from rank 0

    def broadcast(self, message: Any = None) -> Any:
        """Rank 0's `message` (JSON-able) on every rank; the others pass nothing. None
        costs one collective (its length, 0) instead of two."""
        if self.stream is not None:
            with mx.stream(self.stream):
                return self._broadcast(message)
        return self._broadcast(message)

    def _broadcast(self, message: Any) -> Any:
        payload = b""
        if self.leader and message is not None:
            payload = json.dumps(message, separators=(",", ":")).encode()
        size = mx.distributed.all_sum(mx.array(len(payload), dtype=mx.int32), group=self.group)
        length = size.item()
        if length == 0:
            return None
        data = (mx.array(np.frombuffer(payload, dtype=np.uint8)) if self.leader
                else mx.zeros((length,), dtype=mx.uint8))
        received = mx.distributed.all_sum(data, group=self.group)
        return json.loads(bytes(np.array(received, copy=False)))

    # ------------------------------------------------------------ every rank's values

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Each rank's `values` (same length everywhere, each < 2**32), by rank."""
        mine = mx.array(values, dtype=mx.uint32)
        with mx.stream(self.stream or mx.default_stream(mx.default_device())):
            everyone = mx.distributed.all_gather(mine, group=self.group)
        return np.array(everyone, copy=False).reshape(self.size, len(values)).tolist()

    def digests(self, text: str) -> list[str]:
        """Every rank's sha256 of its `text` (hex, shortened), by rank."""
        digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint8)
        with mx.stream(self.stream or mx.default_stream(mx.default_device())):
            gathered = mx.distributed.all_gather(mx.array(digest), group=self.group)
        return [bytes(row).hex()[:12] for row in np.array(gathered).reshape(self.size, -1)]

    def agree(self, what: str, text: str, hint: str) -> None:
        """Stops every rank with one line unless all ranks hold the same `text`."""
        digests = self.digests(text)
        differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
        if differing:
            raise GroupFailed(
                f"rank {differing[0]} disagrees with rank 0 on {what} "
                f"({digests[differing[0]]} vs {digests[0]}); {hint}")


class BroadcastSampler:
    """Rank 0's sampler whose tokens every rank receives.

    Each rank computes the same logits, but only rank 0 runs the request's logits
    processors (grammar constraints, penalties) and knows its random state; sending the
    chosen tokens (a few bytes per sequence per step) keeps every rank's batch exact.
    """

    def __init__(self, inner: Any, group: mx.distributed.Group):
        self._inner, self._group = inner, group

    def __call__(self, logprobs: mx.array) -> mx.array:
        tokens = self._inner(logprobs).astype(mx.uint32)
        return mx.distributed.all_sum(tokens, group=self._group)


class ReceivedSampler:
    """A follower's side of BroadcastSampler: adds nothing, takes rank 0's tokens."""

    def __init__(self, group: mx.distributed.Group):
        self._group = group

    def __call__(self, logprobs: mx.array) -> mx.array:
        nothing = mx.zeros((logprobs.shape[0],), dtype=mx.uint32)
        return mx.distributed.all_sum(nothing, group=self._group)


def count_all_sums(collectives: Collectives) -> None:
    """Counts the bytes every all_sum of this process contributes, the model's own included
    (mlx.nn's sharded layers and mlx_lm's MoE blocks call mx.distributed.all_sum), for
    /metrics and bench/distributed.py. Only the array's size is read: nothing is evaluated."""
    original = mx.distributed.all_sum
    if getattr(original, "_swan_counted", False):
        return

    def all_sum(x: Any, *args: Any, **kwargs: Any) -> mx.array:
        collectives.count(x.nbytes if isinstance(x, mx.array) else 4)
        return original(x, *args, **kwargs)

    all_sum._swan_counted = True  # type: ignore[attr-defined]
    mx.distributed.all_sum = all_sum

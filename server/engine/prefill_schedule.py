"""How many waiting sequences to start prefilling together, from what steps cost here.

Batching prefills saves a step's fixed cost per extra member (weights read once, one
launch), but every member waits for the whole group: a step computing eight prompts over a
long cached prefix takes about eight times as long as one on hardware where that attention
is compute bound. With per-step overhead o and waiting sequences of prefill cost w_1..w_k
(arrival order), groups of g finish at the running sums of (o + g * max w in the group);
the group size chosen is the one with the lowest mean finish time, i.e. the lowest mean
time to first token for the queue. Short prompts on a device with a large fixed step cost
batch up to the cap; long ones where attention is expensive go one or two at a time.

A group runs until every member has moved to the decode batch; then the next group is
chosen. One exception keeps a long prompt from blocking the queue: while a member still has
more than a few prefill chunks to go, prompts that fit in one chunk join it at once (each
costs the long one about a step; waiting would cost them all its remaining steps). Until
the step costs are known (the first few steps after start) everything batches up to the cap.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .step_costs import PrefillWork, StepCosts


def group_size(costs: Sequence[float], overhead: float, cap: int) -> int:
    """The number of leading `costs` to prefill together (1 <= n <= cap, ties to larger)."""
    if not costs:
        return 0
    best, best_mean = 1, float("inf")
    for g in range(1, min(len(costs), cap) + 1):
        elapsed, total = 0.0, 0.0
        for start in range(0, len(costs), g):
            group = costs[start:start + g]
            elapsed += overhead + len(group) * max(group)
            total += elapsed * len(group)
        mean = total / len(costs)
        if mean <= best_mean * (1 + 1e-9):
            best, best_mean = g, mean
    return best


@dataclass
class _Reading:
    cached: int  # prompt tokens the sequence started with in its cache
    total: int  # the rest of the prompt, last token included
    done: int = 0  # of `total`, computed so far

    @property
    def prefilling(self) -> bool:
        # Until the sequence has moved to the decode batch (its last prompt token is decoded
        # there): a group started while it moves would put its prefill in the step that
        # gives this one its first token, delaying it by a whole prefill.
        return self.done < self.total


# A group member with more prefill chunks than this still to go lets short prompts join.
_LONG_PREFILL_CHUNKS = 3


class PrefillScheduler:
    def __init__(self, cap: int, chunk: int):
        self.cap = cap
        self.chunk = chunk  # BatchGenerator's prefill_step_size
        self.costs = StepCosts()
        self._reading: dict[int, _Reading] = {}  # the sequences still prefilling

    @property
    def busy(self) -> bool:
        """Whether the current group is still reading its prompts."""
        return bool(self._reading)

    def may_start(self) -> bool:
        """Whether how_many can be more than 0 now (a cheap test before costing prompts)."""
        group = list(self._reading.values())
        return not group or (len(group) < self.cap and self._long(group))

    def _long(self, group: list[_Reading]) -> bool:
        return any(r.total - 1 - r.done > _LONG_PREFILL_CHUNKS * self.chunk for r in group)

    def started(self, uid: int, cached: int, prompt_length: int) -> None:
        self._reading[uid] = _Reading(cached, prompt_length - cached)

    def ended(self, uid: int) -> None:
        self._reading.pop(uid, None)

    def how_many(self, waiting: Sequence[PrefillWork], decode_rows: int) -> int:
        """How many of `waiting` (arrival order) to start now."""
        group = list(self._reading.values())
        if group:
            if not self._long(group):
                return 0
            short = itertools.takewhile(lambda w: w.tokens <= self.chunk, waiting)
            return min(sum(1 for _ in short), self.cap - len(group))
        if not waiting:
            return 0
        if not self.costs.ready:
            return min(len(waiting), self.cap)
        costs = [self.costs.prefill_cost(w) for w in waiting]
        # Each group takes two steps before the next can start: its prefill, and the step
        # that moves it to the decode batch. Both carry the step's fixed cost and decode rows.
        overhead = 2 * self.costs.step_overhead(decode_rows)
        return group_size(costs, overhead, self.cap)

    def step_done(self, seconds: float, decode_rows: int, prompt_responses: Sequence[Any]
                  ) -> dict[int, PrefillWork]:
        """Records a BatchGenerator step (its time, decode rows and prompt progress); returns
        the prompt tokens each sequence computed in it."""
        chunks: dict[int, PrefillWork] = {}
        for response in prompt_responses:
            reading = self._reading.get(response.uid)
            if reading is None:
                continue
            done = response.progress[0]
            # The end of a prompt reports its last token, which the decode step computes.
            if not response.end_of_prompt and done > reading.done:
                chunks[response.uid] = PrefillWork(done - reading.done,
                                                   reading.cached + reading.done)
            reading.done = max(reading.done, done)
            if not reading.prefilling:
                del self._reading[response.uid]
        self.costs.observe(seconds, decode_rows, list(chunks.values()))
        return chunks

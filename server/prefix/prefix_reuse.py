"""The prefix cache inside continuous batching: what a new sequence starts from, where its
prompt is cut so that states can be saved on the way, and when to save them.

A prompt is fed to BatchGenerator as segments; it stops at the end of each one, which is
where the generation thread copies the sequence's state out (`reached`). States are saved

- at the end of the prompt's first segment when more turns follow: a chat template ends
  every message with a turn-end token (<|im_end|>, <|eot_id|>: the tokenizer's end of
  sequence ids), and the first message is the system prompt and tools every turn and
  every conversation of an agent resends (kept longest);
- one token before the end of the prompt (the last token is always computed, to get the
  first logits): the next turn of the conversation, or another choice of an n > 1
  request, starts there;
- when the sequence ends, prompt and generated tokens together (`finished`).

For trimmable models a deeper state makes the shallower ones of the same path redundant,
so these mostly replace each other; models with recurrent layers keep each one.

When a sequence in flight is about to save a state covering more of a new prompt than the
cache holds now (concurrent requests with one system prompt, the choices of n > 1), the
new sequence waits for it rather than compute the same tokens alongside: `plan` returns
None until that state is saved or its sequence is gone.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .kv_state import State, detached, evaluate, is_kv, is_trimmable, state_nbytes, view
from .prefix_cache import Entry, PrefixCache, Priority

log = logging.getLogger("swan_serve.prefix_cache")


@dataclass(eq=False)
class Plan:
    """How one sequence's prompt goes into the batch."""

    prompt: Sequence[int]
    cached: int  # prompt tokens `state` covers
    state: State | None  # None: start from an empty cache
    segments: list[list[int]]  # the rest of the prompt, cut at the boundaries
    # Boundaries (depth, priority) whose states are still to be saved, shallowest first.
    pending: deque[tuple[int, Priority]] = field(default_factory=deque)
    source: str | None = None  # the tier `state` came from: "memory", "disk" or None

    @property
    def all_tokens(self) -> list[int]:
        return list(self.prompt[:self.cached])


def cut(prompt: Sequence[int], start: int, boundaries: Iterable[int]) -> list[list[int]]:
    """prompt[start:] split at each boundary (absolute positions, increasing)."""
    segments, last = [], start
    for boundary in boundaries:
        if last < boundary < len(prompt):
            segments.append(list(prompt[last:boundary]))
            last = boundary
    segments.append(list(prompt[last:]))
    return segments


def first_segment_end(prompt: Sequence[int], turn_ends: frozenset[int]) -> int | None:
    """Position after the prompt's first turn-end token, when another turn follows it."""
    ends = (i + 1 for i, token in enumerate(prompt[:-1]) if token in turn_ends)
    first, second = next(ends, None), next(ends, None)
    return first if second is not None else None


class PrefixReuse:
    def __init__(self, budget_bytes: int, turn_ends: Iterable[int],
                 on_evict: Callable[[Entry], None] | None = None):
        self.cache = PrefixCache(budget_bytes, on_evict)
        # The cache's budget moves with the running batch (kv_memory.py); off stays off.
        self.enabled = budget_bytes > 0
        self._turn_ends = frozenset(turn_ends)
        self._in_flight: set[Plan] = set()
        # The disk tier (prefix_store.DiskTier), when the cache has a folder.
        self.lower: Any = None

    # ------------------------------------------------------------ admission

    def plan(self, prompt: Sequence[int]) -> Plan | None:
        """The plan for a new sequence, or None while it should wait for a prefix another
        sequence is computing. A returned plan is in flight until `finished`/`abandon`."""
        if not self.enabled:
            return Plan(prompt, 0, None, [list(prompt)])
        limit = len(prompt) - 1  # the last token is always computed: it gives the logits
        match = self.cache.lookup(prompt, limit)
        cached = match.length if match else 0
        state = view(match.entry.state, match.trim) if match else None
        source = "memory" if match else None
        loaded = self.lower.fetch(prompt, limit, cached) if self.lower is not None else None
        if loaded is not None:
            cached, state, source = loaded.length, self._adopt(loaded), "disk"
        if self._coming(prompt, cached):
            return None
        boundaries = self._boundaries(prompt, cached)
        plan = Plan(
            prompt, cached, state,
            cut(prompt, cached, [depth for depth, _ in boundaries]),
            deque(boundaries), source,
        )
        self._in_flight.add(plan)
        return plan

    def _adopt(self, loaded: Any) -> State:
        """Puts a state read from disk back into memory (when the budget lets it) and
        returns the part the prompt shares."""
        self.cache.store(loaded.tokens, loaded.state, state_nbytes(loaded.state),
                         is_trimmable(loaded.state), loaded.priority)
        return view(loaded.state, len(loaded.tokens) - loaded.length)

    def cached_length(self, prompt: Sequence[int]) -> int:
        """Prompt tokens a sequence would start with from the cache now (nothing is used)."""
        if not self.enabled:
            return 0
        match = self.cache.lookup(prompt, len(prompt) - 1, touch=False)
        return match.length if match else 0

    def _boundaries(self, prompt: Sequence[int], cached: int) -> list[tuple[int, Priority]]:
        marks = {len(prompt) - 1: Priority.TURN}
        shared = first_segment_end(prompt, self._turn_ends)
        if shared is not None:
            marks[shared] = Priority.SHARED
        return sorted((depth, p) for depth, p in marks.items() if depth > cached)

    def _coming(self, prompt: Sequence[int], cached: int) -> bool:
        """Whether a sequence in flight will soon save a longer prefix of `prompt`."""
        limit = len(prompt) - 1
        for plan in self._in_flight:
            for depth, _ in plan.pending:
                if cached < depth <= limit and plan.prompt[:depth] == prompt[:depth]:
                    return True
        return False

    # ------------------------------------------------------------ saving states

    def reached(self, plan: Plan, state: State, tokens: list[int]) -> None:
        """The sequence finished a segment: `state` covers `tokens` (the prompt so far)."""
        while plan.pending and plan.pending[0][0] < len(tokens):
            plan.pending.popleft()  # passed without a stop (cannot happen; be safe)
        if plan.pending and plan.pending[0][0] == len(tokens):
            _, priority = plan.pending.popleft()
            self._save(tokens, state, priority)

    def finished(self, plan: Plan, state: State | None, tokens: list[int] | None
                 ) -> Entry | None:
        """The sequence ended (or was removed): saves what it computed, if anything, and
        returns the entry that holds it (None when nothing new was stored)."""
        self.abandon(plan)
        if state is not None and tokens:
            return self._save(tokens, state, Priority.TURN)
        return None

    def extended(self, tokens: list[int], state: State) -> Entry | None:
        """A state computed ahead of any request (lookahead.py): saved as a turn's end."""
        return self._save(tokens, state, Priority.TURN)

    def abandon(self, plan: Plan) -> None:
        plan.pending.clear()
        self._in_flight.discard(plan)

    def _save(self, tokens: list[int], state: State, priority: Priority) -> Entry | None:
        if not self.enabled:
            return None
        try:
            if not _covers(state, len(tokens)):
                log.warning("not caching a state of %d tokens: its size does not match",
                            len(tokens))
                return None
            owned = detached(state)  # lazy: nothing is copied unless it is kept
            entry = self.cache.store(tokens, owned, state_nbytes(owned), is_trimmable(owned),
                                     priority)
            if entry is not None:
                # Queued behind the step that computed it: the copy does not hold up the
                # sequence's next step.
                evaluate(owned, wait=False)
            return entry
        except Exception:  # the cache is an optimisation: never fail a request for it
            log.exception("could not save a prefix state")
            return None


def _covers(state: State, length: int) -> bool:
    """Attention layers that count positions must hold exactly `length` of them."""
    offsets = [layer.offset for layer in state if is_kv(layer) and not layer.empty()]
    return all(offset == length for offset in offsets)

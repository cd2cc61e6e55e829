"""Computing a chat turn's separator ahead, while the server has nothing else to do.

When a chat sequence ends, its state (prompt and answer) goes into the prefix cache. The
conversation's next request resends all of it, then the chat template's turn separator
(for Qwen `<|im_end|> \\n <|im_start|> user \\n`: the same whoever speaks next), then new
content. The separator is known as soon as the answer ends, so the generation thread
computes it onto the saved state when idle and caches the longer state: the next request
has those tokens fewer to prefill before its first token.

A request that arrives meanwhile waits for at most one of these small steps. A guess that
turns out wrong (the client edits the answer, a reasoning model's thinking is dropped from
the history) costs only that idle step: the cache still holds the shorter state's tokens,
as a trim of the longer one or as the state itself.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from .kv_state import evaluate, extendable
from .prefix_cache import Entry
from .prefix_reuse import PrefixReuse

log = logging.getLogger("swan_serve.prefix_cache")


class TurnLookahead:
    def __init__(self, model: Any, separator: tuple[int, ...], prefixes: PrefixReuse,
                 stream: Any, limit: int, on_computed: Callable[[int], None] | None = None):
        self._model = model
        self._separator = separator
        self._prefixes = prefixes
        self._stream = stream
        # Only the most recent turns: an older one's conversation has likely moved on.
        self._pending: deque[tuple[Entry, tuple[int, ...]]] = deque(maxlen=max(1, limit))
        self._on_computed = on_computed

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def turn_ended(self, entry: Entry | None, finish_reason: str, last_token: int) -> None:
        """A chat answer ended on `last_token` and `entry` holds its state (which covers
        that token). After a stop token that token is the separator's first; after
        max_tokens the whole separator follows (the template closes the message)."""
        if entry is None or not self._separator:
            return
        if finish_reason == "length":
            ahead = self._separator
        elif finish_reason == "stop" and last_token == self._separator[0]:
            ahead = self._separator[1:]
        else:  # another end-of-sequence token: the template would not render it
            return
        if ahead:
            self._pending.append((entry, ahead))

    def compute_one(self) -> None:
        """Extends the most recent pending state by its separator and caches the result."""
        entry, ahead = self._pending.pop()
        if not self._prefixes.cache.holds(entry):
            return  # evicted, or replaced by a deeper state of its conversation
        try:
            with mx.stream(self._stream):
                state = extendable(entry.state)
                self._model(mx.array([list(ahead)]), cache=state)
                evaluate(state)
                stored = self._prefixes.extended(list(entry.tokens()) + list(ahead), state)
        except Exception:  # an optimisation: never let it stop the server
            log.exception("could not compute a turn separator ahead")
            return
        if stored is not None and self._on_computed is not None:
            self._on_computed(len(ahead))

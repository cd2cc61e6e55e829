"""How much memory a sequence's KV cache takes, and the budget every KV cache shares.

The budget (`--max-kv-bytes`, or half the memory free once the model is loaded) covers the
running batch's caches and the prefix cache's memory tier together. A request reserves
what its sequences can grow to (prompt + max_tokens) when it is submitted; past the budget
it gets 429. The generation thread moves a sequence into the batch only when the batch's
caches, as BatchGenerator lays them out (every row padded to the longest), still fit beside
the prefix cache, which gives way first (its states spill to disk when it has a folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, CacheList, RotatingKVCache

from ..prefix.kv_state import is_kv
from .quantized_kv import choose_group_size, make_cache

# Share of the memory free after loading that KV caches may use by default; the rest is
# for activations, the prefill's temporaries and the rest of the machine.
KV_SHARE = 0.5
FALLBACK_BYTES = 2 << 30
# mlx-lm's KV caches allocate positions in steps of this many.
CACHE_STEP = 256


@dataclass(frozen=True)
class KVFootprint:
    """Bytes of one sequence's cache as a function of its length."""

    fixed: int  # recurrent (linear-attention) states: the same at any length
    per_token: int  # full-attention layers: every position
    windows: tuple[tuple[int, int], ...] = ()  # (bytes per position, window) per sliding layer

    def bytes_for(self, tokens: int) -> int:
        tokens = -(-tokens // CACHE_STEP) * CACHE_STEP  # caches grow in whole steps
        windowed = sum(per * min(tokens, window) for per, window in self.windows)
        return self.fixed + self.per_token * tokens + windowed

    def batch_bytes(self, lengths: Sequence[int]) -> int:
        """A batch's caches: BatchGenerator pads every row to the longest."""
        return len(lengths) * self.bytes_for(max(lengths)) if lengths else 0


@dataclass(frozen=True)
class KVLayout:
    """What the running batch's caches are made of."""

    bits: int | None
    group_size: int
    footprint: KVFootprint

    def new_cache(self, model: Any) -> list[Any]:
        return make_cache(model, self.bits, self.group_size)


def measure_layout(model: Any, bits: int | None, group_size: int | None) -> KVLayout:
    """Runs the model on one token to learn its caches' head sizes and bytes per position.
    Raises ValueError when `bits` is set and no quantization group fits the heads."""
    float_cache = _one_token(model, make_cache(model, None, 0))
    heads = {d for layer in _layers(float_cache) if is_kv(layer) and layer.keys is not None
             for d in (layer.keys.shape[-1], layer.values.shape[-1])}
    group = choose_group_size(heads, group_size) if bits is not None and heads else 64
    cache = float_cache if bits is None else _one_token(model, make_cache(model, bits, group))
    return KVLayout(bits, group, _footprint(cache))


def _one_token(model: Any, cache: list[Any]) -> list[Any]:
    model(mx.array([[0]]), cache=cache)
    mx.eval([layer.state for layer in cache])
    return cache


def _layers(cache: list[Any]) -> list[Any]:
    flat = []
    for layer in cache:
        flat.extend(_layers(layer.caches) if isinstance(layer, CacheList) else [layer])
    return flat


def _footprint(cache: list[Any]) -> KVFootprint:
    fixed, per_token, windows = 0, 0, []
    for layer in _layers(cache):
        if is_kv(layer) and layer.keys is not None:
            positions = (layer.keys[0] if isinstance(layer.keys, tuple) else layer.keys).shape[2]
            per_token += layer.nbytes // positions
        elif isinstance(layer, RotatingKVCache) and layer.keys is not None:
            windows.append((layer.nbytes // layer.keys.shape[2], layer.max_size))
        elif isinstance(layer, ArraysCache):
            fixed += layer.nbytes
        else:  # a kind this does not know: count what it holds after one token per token
            per_token += getattr(layer, "nbytes", 0)
    return KVFootprint(fixed, per_token, tuple(windows))


def default_budget(free_bytes: int | None) -> int:
    return int(free_bytes * KV_SHARE) if free_bytes else FALLBACK_BYTES


class BatchMemory:
    """Keeps the running batch's caches and the prefix cache's memory tier within the KV
    budget: the prefix cache gets what the batch leaves, up to its own cap."""

    def __init__(self, layout: KVLayout, model: Any, budget: int, prefix_cap: int,
                 prefix_cache: Any, running: Any):
        self.layout = layout
        self.budget = budget
        self._model = model
        self._prefix_cap = min(prefix_cap, budget)
        self._prefix_cache = prefix_cache  # prefix_cache.PrefixCache
        self._running = running  # () -> the reach (positions) of each running sequence
        self.running_bytes = 0

    def new_cache(self) -> list[Any]:
        return self.layout.new_cache(self._model)

    def fitting(self, candidates: Sequence[Any]) -> int:
        """How many of `candidates` (first first) can join the batch now; makes room for
        them in the prefix cache. A lone sequence always runs (its reservation fit)."""
        running = list(self._running())
        for take in range(len(candidates), 0, -1):
            need = self.layout.footprint.batch_bytes(
                running + [c.reach for c in candidates[:take]])
            if need <= self.budget or (take == 1 and not running):
                self._give_prefixes(need)
                return take
        return 0

    def settle(self) -> None:
        """After sequences ended: the prefix cache may use what they freed."""
        need = self.layout.footprint.batch_bytes(list(self._running()))
        if need != self.running_bytes:
            self._give_prefixes(need)

    def _give_prefixes(self, running_bytes: int) -> None:
        self.running_bytes = running_bytes
        self._prefix_cache.set_budget(max(0, min(self._prefix_cap,
                                                 self.budget - running_bytes)))

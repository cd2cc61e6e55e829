"""Attention KV stored quantized in the running batch (`--kv-bits 8|4`).

mlx-lm (0.32) has a quantized cache for one sequence (QuantizedKVCache: keys and values as
(packed, scales, biases) triples, attention through `quantized_matmul`) but no batched one,
so BatchGenerator cannot merge, split or extract it. This module adds what batching needs:

- QuantizedKV: mlx-lm's QuantizedKVCache plus `merge`, the hook BatchGenerator calls to
  build a batch from the caches it is given (a fresh sequence's, or a prefix-cache state);
- BatchQuantizedKVCache: the batch's cache, BatchKVCache's bookkeeping (left padding, per
  row offsets, filter/extend/extract) over quantized triples. It has `bits` and
  `group_size`, so mlx-lm's attention takes its quantized path for it.

Only full-attention KVCache layers are replaced: sliding-window and linear-attention
(recurrent) layers keep their float caches, which are bounded by a window or fixed-size.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    _BaseCache,
    create_causal_mask,
    dynamic_roll,
    make_prompt_cache,
)

Triple = tuple[mx.array, mx.array, mx.array]  # packed values, scales, biases

# MLX's affine quantization groups (mx.quantize accepts only these).
GROUP_SIZES = (32, 64, 128)
BITS = (4, 8)


class QuantizedKV(QuantizedKVCache):
    """One sequence's quantized KV that BatchGenerator can put into a batch."""

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)

    def size(self) -> int:
        return self.offset


def _slice(triple: Triple, start: int, stop: int) -> Triple:
    return tuple(x[..., start:stop, :] for x in triple)  # type: ignore[return-value]


def _joined(first: Triple, then: Triple, axis: int = 2) -> Triple:
    return tuple(mx.concatenate([a, b], axis=axis)
                 for a, b in zip(first, then, strict=True))  # type: ignore[return-value]


class BatchQuantizedKVCache(_BaseCache):
    """A batch of quantized KV, rows left-padded to a common length (as BatchKVCache)."""

    step = 256

    def __init__(self, left_padding: list[int], group_size: int, bits: int):
        self.keys: Triple | None = None
        self.values: Triple | None = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self._right_padding: mx.array | None = None
        self.group_size = group_size
        self.bits = bits

    # ------------------------------------------------------------ the model's side

    def _grow(self, keys: mx.array, values: mx.array) -> None:
        batch, heads, steps, _ = keys.shape
        new = (self.step + steps - 1) // self.step * self.step
        per_word = 32 // self.bits

        def zeros(dim: int, dtype: Any) -> Triple:
            shape = (batch, heads, new)
            return (mx.zeros((*shape, dim // per_word), dtype=mx.uint32),
                    mx.zeros((*shape, dim // self.group_size), dtype=dtype),
                    mx.zeros((*shape, dim // self.group_size), dtype=dtype))

        fresh_k = zeros(keys.shape[-1], keys.dtype)
        fresh_v = zeros(values.shape[-1], values.dtype)
        if self.keys is None or self.values is None:
            self.keys, self.values = fresh_k, fresh_v
            return
        self.keys = _joined(_slice(self.keys, 0, self._idx), fresh_k)
        self.values = _joined(_slice(self.values, 0, self._idx), fresh_v)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Triple, Triple]:
        prev = self._idx
        if self.keys is None or prev + keys.shape[2] > self.keys[0].shape[2]:
            self._grow(keys, values)
        assert self.keys is not None and self.values is not None
        self._idx += keys.shape[2]
        self.offset = self.offset + keys.shape[2]
        q_keys = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        q_values = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        for stored, new in zip(self.keys + self.values, q_keys + q_values, strict=True):
            stored[..., prev:self._idx, :] = new
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[Triple, Triple]:
        assert self.keys is not None and self.values is not None
        return _slice(self.keys, 0, self._idx), _slice(self.values, 0, self._idx)

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding,
                                  **kwargs)

    # ------------------------------------------------------------ BatchGenerator's side

    def prepare(self, *, left_padding: list[int] | None = None,
                lengths: list[int] | None = None,
                right_padding: list[int] | None = None) -> None:
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty cache")
            self.left_padding = self.left_padding + mx.array(left_padding)
            self.offset = self.offset - mx.array(left_padding)
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self) -> None:
        """Rows padded on the right in a prefill chunk roll their padding to the left."""
        if self._right_padding is None or self.keys is None or self.values is None:
            return
        padding = self._right_padding
        self.keys, self.values = tree_map(
            lambda x: dynamic_roll(x, padding[:, None], axis=2), (self.keys, self.values))
        self.offset = self.offset - padding
        self.left_padding = self.left_padding + padding
        self._right_padding = None

    @property
    def state(self) -> Any:
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v: Any) -> None:
        self.keys, self.values, self.offset, self.left_padding, self._idx = v

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return sum(x.nbytes for x in self.keys + self.values)

    def filter(self, batch_indices: list[int]) -> None:
        if self.keys is not None and self.values is not None:
            self.keys, self.values = tree_map(lambda x: x[batch_indices],
                                              (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist()) if batch_indices else 0
        if shift > 0:  # every row is padded: drop the common padding
            if self.keys is not None and self.values is not None:
                self.keys = _slice(self.keys, shift, self.keys[0].shape[2])
                self.values = _slice(self.values, shift, self.values[0].shape[2])
            self._idx -= shift
            self.left_padding = self.left_padding - shift

    def extend(self, other: BatchQuantizedKVCache) -> None:
        """Appends `other`'s rows, right-aligning both at the longer one's index."""
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        template = self if self.keys is not None else other
        assert template.keys is not None and template.values is not None
        idx = max(self._idx, other._idx)
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def aligned(c: BatchQuantizedKVCache) -> tuple[Triple, Triple, mx.array]:
            rows = c.offset.shape[0]
            if c.keys is None or c.values is None:
                keys = tuple(mx.zeros((rows, *x.shape[1:2], 0, x.shape[3]), x.dtype)
                             for x in template.keys)
                values = tuple(mx.zeros((rows, *x.shape[1:2], 0, x.shape[3]), x.dtype)
                               for x in template.values)
            else:
                keys, values = c.keys, c.values
            left = idx - c._idx
            right = size - keys[0].shape[2] - left
            if right < 0:
                keys, values = (_slice(t, 0, t[0].shape[2] + right) for t in (keys, values))
                right = 0
            if left or right:
                pad = [(0, 0), (0, 0), (left, right), (0, 0)]
                keys, values = tree_map(lambda x: mx.pad(x, pad), (keys, values))
            return keys, values, c.left_padding + left

        mine, theirs = aligned(self), aligned(other)
        self.keys = _joined(mine[0], theirs[0], axis=0)
        self.values = _joined(mine[1], theirs[1], axis=0)
        self.left_padding = mx.concatenate([mine[2], theirs[2]])
        self.offset = mx.concatenate([self.offset, other.offset])
        self._idx = idx

    def extract(self, idx: int) -> QuantizedKV:
        """Row `idx` as one sequence's cache, owning exactly its positions."""
        assert self.keys is not None and self.values is not None
        padding = self.left_padding.tolist()[idx]
        cache = QuantizedKV(group_size=self.group_size, bits=self.bits)
        cache.keys, cache.values = tree_map(
            lambda x: mx.contiguous(x[idx:idx + 1, :, padding:self._idx]),
            (self.keys, self.values))
        cache.offset = self._idx - padding
        return cache

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        """One batch from single-sequence quantized caches (left-padded to the longest)."""
        first = caches[0]
        lengths = [c.offset for c in caches]
        longest = max(lengths)
        batch = cls([longest - n for n in lengths], first.group_size, first.bits)
        filled = [c for c in caches if c.keys is not None and c.offset > 0]
        if not filled:
            return batch
        sample = filled[0]

        def zeros(triple: Triple) -> Triple:
            return tuple(mx.zeros((len(caches), x.shape[1], longest, x.shape[3]), x.dtype)
                         for x in triple)  # type: ignore[return-value]

        keys, values = zeros(sample.keys), zeros(sample.values)
        for row, cache in enumerate(caches):
            if cache.keys is None or cache.offset == 0:
                continue
            start = longest - cache.offset
            for stored, part in zip(keys + values, cache.keys + cache.values, strict=True):
                stored[row:row + 1, :, start:longest] = part[..., :cache.offset, :]
        batch.keys, batch.values = keys, values
        batch.offset = batch.offset + longest
        batch._idx = longest
        return batch


# ------------------------------------------------------------ building caches


def make_cache(model: Any, bits: int | None, group_size: int) -> list[Any]:
    """A fresh cache for one sequence: the model's own, full-attention layers quantized
    when `bits` is set."""
    cache = make_prompt_cache(model)
    if bits is None:
        return cache
    return [QuantizedKV(group_size=group_size, bits=bits) if type(layer) is KVCache
            else layer for layer in cache]


def portable(state: list[Any]) -> list[Any]:
    """The state with mlx-lm's own classes (for files that stock mlx-lm can read)."""
    return [QuantizedKVCache.from_state(layer.state) if isinstance(layer, QuantizedKV)
            else layer for layer in state]


def batchable(state: list[Any]) -> list[Any]:
    """The state with classes BatchGenerator can batch (a state read from a file)."""
    return [QuantizedKV.from_state(layer.state) if type(layer) is QuantizedKVCache
            else layer for layer in state]


def choose_group_size(head_dims: set[int], requested: int | None) -> int:
    """The KV quantization group: `requested`, or the largest of 64 and 32 that divides
    every attention head dim. Raises ValueError when none does."""
    if requested is not None:
        bad = sorted(d for d in head_dims if d % requested)
        if bad:
            raise ValueError(f"--kv-group-size {requested} does not divide the model's "
                             f"attention head size {bad[0]}")
        return requested
    for size in (64, 32):
        if all(d % size == 0 for d in head_dims):
            return size
    raise ValueError(f"the model's attention head size {min(head_dims)} cannot be "
                     f"quantized by MLX (groups of {', '.join(map(str, GROUP_SIZES))})")

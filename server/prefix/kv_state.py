"""What the prefix cache needs to know about mlx_lm's per-layer cache objects.

A model's state is a list with one cache object per layer:

- KVCache (full attention): trimmable, forgetting positions only lowers `offset`;
  QuantizedKVCache (`--kv-bits`) the same, its keys and values (packed, scales, biases).
- RotatingKVCache (sliding-window attention): trimmable until it has wrapped around its
  window (`offset < max_size`); after that old positions are overwritten and it is not.
- ArraysCache (the conv and recurrent states of linear-attention / SSM layers, e.g. the
  Gated DeltaNet layers of Qwen3.5/Qwen3-Next): a fixed-size summary of every token so
  far, which cannot be rewound; reusable only at exactly the depth it was saved.
- CacheList: trimmable when all of its parts are.

A model's state is trimmable only when every layer's is. Stored states are never changed:
BatchGenerator merges the caches it is given into new batch arrays (the one copy every
sequence gets), and a shorter prefix is a new cache object over the same arrays with a
lower offset, so a hit copies nothing of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import KVCache, QuantizedKVCache

State = list[Any]  # one mlx_lm cache object per layer


def _arrays(state: State) -> Iterator[mx.array]:
    for layer in state:
        for _, value in tree_flatten(layer.state):
            if isinstance(value, mx.array):
                yield value


def state_nbytes(state: State) -> int:
    """Bytes of the arrays the state holds (each array once, however often referenced)."""
    unique = {id(a): a for a in _arrays(state)}
    return sum(a.nbytes for a in unique.values())


def is_trimmable(state: State) -> bool:
    return all(layer.is_trimmable() for layer in state)


def _own(value: Any) -> Any:
    # A slice of a batch array can be a view that keeps the whole batch buffer alive (and
    # mx.contiguous returns such a view as it is when it is already row-contiguous):
    # mx.array always copies exactly the slice out of it.
    return mx.array(value) if isinstance(value, mx.array) else value


def is_kv(layer: Any) -> bool:
    """A full-attention cache that counts positions (float or quantized)."""
    return isinstance(layer, (KVCache, QuantizedKVCache))


def _positions(layer: Any) -> int:
    """Positions a KV layer's arrays have room for (>= its offset)."""
    keys = layer.keys[0] if isinstance(layer, QuantizedKVCache) else layer.keys
    return keys.shape[2]


def _detached_layer(layer: Any) -> Any:
    if is_kv(layer) and layer.keys is not None:
        # KV caches grow their arrays in steps of 256 positions: keep only the used ones.
        keys, values = tree_map(lambda x: _own(x[..., :layer.offset, :]),
                                (layer.keys, layer.values))
        rest = tuple(layer.state[2:])  # offset (and a quantized cache's group and bits)
        return type(layer).from_state((keys, values, *rest))
    return type(layer).from_state(tree_map(_own, layer.state))


def detached(state: State) -> State:
    """A copy that owns exactly the bytes it reports (lazy: evaluate it when kept)."""
    return [_detached_layer(layer) for layer in state]


def evaluate(state: State, wait: bool = True) -> None:
    """Computes the state's arrays; wait=False queues the work and returns at once."""
    arrays = list(_arrays(state))
    if wait:
        mx.eval(arrays)
    else:
        mx.async_eval(arrays)


def view(state: State, trim: int = 0) -> State:
    """New cache objects over the same arrays, the last `trim` positions forgotten.

    BatchGenerator never writes to the caches it is given (it merges them into batch
    arrays), so the stored state stays as it is.
    """
    # tree_map rebuilds the containers (an ArraysCache's list), sharing only the arrays.
    layers = [type(layer).from_state(tree_map(lambda x: x, layer.state)) for layer in state]
    if trim:
        for layer in layers:
            layer.trim(trim)
    return layers


def extendable(state: State) -> State:
    """Cache objects the model can run on to extend `state` without writing into its arrays.

    A KV cache holding exactly its positions (as stored states do) moves to new, larger
    arrays on its next token, so it can share them; other layers may write in place (a
    rotating window) and are copied: their arrays are bounded by a window or fixed size.
    """
    layers = []
    for layer in state:
        exact = is_kv(layer) and (layer.keys is None or _positions(layer) == layer.offset)
        layers.append(view([layer])[0] if exact else _detached_layer(layer))
    return layers


# ------------------------------------------------------------ memory


def free_memory_bytes() -> int | None:
    """Memory this process could still use on the default device, if it can be told."""
    if mx.default_device().type == mx.DeviceType.gpu:
        info = mx.device_info()
        limit = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if limit:
            return max(0, int(limit) - mx.get_active_memory())
    return _system_available_bytes()


def _system_available_bytes() -> int | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():  # Linux: MemAvailable counts reclaimable page cache as free
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None

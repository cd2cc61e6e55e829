"""Spills prefix-cache states to disk in a loop, through the server's own DiskTier, until
it is killed: the subject of the kill -9 test (test_prefix_disk_crash.py).

Run in a child of a multiprocessing forkserver that has imported MLX and mlx-lm once, so
each of the test's many kills costs a fork, not a Python start-up. Each state is made from
its tokens (seeded), so the test can check that every entry left holds exactly the right
arrays. After each spill returns (file written, fsynced, renamed) it reports the number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from swan_serve.server.engine.quantized_kv import QuantizedKV
from swan_serve.server.prefix.kv_state import detached, state_nbytes
from swan_serve.server.prefix.prefix_cache import PrefixCache, Priority
from swan_serve.server.prefix.prefix_store import DiskTier


def tokens_of(number: int) -> list[int]:
    return [number % 97, number, *range(40 + number % 50)]


def state_of(tokens: list[int]) -> list[Any]:
    """A float and a quantized attention layer, their arrays seeded by the tokens."""
    mx.random.seed(sum(tokens) * 31 + len(tokens))
    keys = mx.random.normal((1, 2, len(tokens), 64))
    float_layer, quantized = KVCache(), QuantizedKV(group_size=32, bits=4)
    float_layer.update_and_fetch(keys, keys * 2)
    quantized.update_and_fetch(keys, keys - 1)
    return detached([float_layer, quantized])


def spill_forever(folder: Path, first: int, progress: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    disk = DiskTier(folder, 1 << 30)  # no scan: the test checks the folder between kills
    memory = PrefixCache(1 << 30)  # where entries come from in the server
    progress.send("ready")
    number = first
    while True:
        tokens = tokens_of(number)
        state = state_of(tokens)
        mx.eval([layer.state for layer in state])
        entry = memory.store(tokens, state, state_nbytes(state), False, Priority.TURN)
        disk.spill(entry)
        progress.send(number)
        number += 1

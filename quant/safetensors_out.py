"""Write safetensors shards whose tensors arrive piece by piece, in any order.

Every output shape and dtype is known before any weight is fitted, so each
shard's header is written first and the file sized in full; fitted row blocks
are then written straight to their byte offsets. Nothing is held whole in
memory. Within a shard, tensors are ordered by element size (4-byte first), so
every tensor starts aligned to its own element size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ITEMSIZE = {"U32": 4, "F32": 4, "BF16": 2, "F16": 2, "U8": 1}
DTYPE_OF_NAME = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # mlx_lm's own shard size


@dataclass(frozen=True)
class OutTensor:
    key: str
    dtype: str  # "U32" | "F32" | "BF16" | "F16" | "U8"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


def to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values already representable in `dtype` -> the array of stored bytes."""
    values = np.asarray(values)
    if dtype == "U32":
        return values.astype("<u4", copy=False)
    if dtype == "U8":
        return values.astype(np.uint8, copy=False)
    if dtype == "F32":
        return values.astype("<f4", copy=False)
    if dtype == "F16":
        return values.astype("<f2")
    if dtype == "BF16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        return (bits >> np.uint32(16)).astype("<u2")
    raise ValueError(f"unsupported output dtype {dtype}")


def plan_shards(tensors: list[OutTensor], max_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[list]:
    """Split tensors (in the given order) into shards of at most max_bytes (a bigger
    tensor gets a shard of its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """One output shard: header written on creation, data written at offsets."""

    def __init__(self, path: Path, tensors: list[OutTensor]):
        self.path = path
        ordered = sorted(tensors, key=lambda t: (-ITEMSIZE[t.dtype], t.key))
        header: dict[str, object] = {"__metadata__": {"format": "mlx"}}
        self.offsets: dict[str, int] = {}
        self.specs = {t.key: t for t in ordered}
        offset = 0
        for t in ordered:
            header[t.key] = {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            self.offsets[t.key] = offset
            offset += t.nbytes
        body = json.dumps(header, separators=(",", ":")).encode()
        body += b" " * (-len(body) % 8)
        self.data_start = 8 + len(body)
        self.size = self.data_start + offset
        self._file = open(path, "wb+")  # closed in close()
        self._file.write(struct.pack("<Q", len(body)) + body)
        self._file.truncate(self.size)
        self.written: dict[str, int] = {t.key: 0 for t in ordered}

    def write(self, key: str, data: np.ndarray, first_element: int = 0) -> None:
        """Write `data` (already in storage dtype) starting at flat element `first_element`."""
        spec = self.specs[key]
        raw = memoryview(np.ascontiguousarray(data)).cast("B")
        start = self.offsets[key] + first_element * ITEMSIZE[spec.dtype]
        if start + raw.nbytes > self.offsets[key] + spec.nbytes:
            raise RuntimeError(f"{key}: write past the end of the tensor")
        self._file.seek(self.data_start + start)
        self._file.write(raw)
        self.written[key] += raw.nbytes

    def close(self, check: bool = True) -> None:
        """Close; with `check`, insist that every tensor was written in full."""
        self._file.close()
        if not check:
            return
        short = [k for k, n in self.written.items() if n != self.specs[k].nbytes]
        if short:  # a bug in the converter, never user input
            raise RuntimeError(f"{self.path.name}: {short[0]} was not written completely")


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: tensor -> shard file, total_size = data bytes (as
    transformers writes it)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2) + "\n")

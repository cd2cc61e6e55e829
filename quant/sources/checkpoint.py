"""Lazy reader of a Hugging Face safetensors checkpoint (one file or a sharded index).

Only the headers are read when a checkpoint is opened; tensor bytes are read on
demand through a short-lived np.memmap of exactly the bytes asked for, so a row
block of a tensor or one expert of a stacked [E, out, in] tensor is read without
touching the rest, and nothing stays mapped (mapped pages count towards RSS).
bf16 becomes float32 by a 16-bit left shift of the raw uint16: no torch.

API:
    open_checkpoint(model_dir) -> Checkpoint          (raises CheckpointError; a Checkpoint
        passed in is returned as it is, so readers also take views such as folded.py's)
    Checkpoint.root, .config (dict from config.json), .files (sorted shard names),
        .tensors (list[TensorInfo], sorted by name), .info(name), name in ckpt,
        .read(name) -> float32 ndarray (the whole tensor),
        .read_rows(name, rows) -> float32 rows of a 2-D tensor (slice or index array),
        .read_expert(name, e) -> float32 [out, in] of a stacked [E, out, in] tensor,
        .read_expert_rows(name, e, rows) -> float32 rows of one expert,
        .fingerprint() -> sha256 over shard names, sizes and headers (cheap identity)
    TensorInfo: name, dtype ("BF16"|"F16"|"F32"|"F64"), shape, file, start, nbytes,
        numel, ndim
    CheckpointError: one clear line; raised for: not a model directory, no safetensors,
        missing or truncated shard, index naming a missing file or tensor, corrupt
        header, unsupported dtype.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SUPPORTED_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors caps headers at 100 MB

Rows = slice | Sequence[int] | np.ndarray


class CheckpointError(Exception):
    """A checkpoint that cannot be analysed; the message is one line for the user."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # shard file name, relative to the checkpoint root
    start: int  # absolute byte offset of the tensor's data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw stored values (uint16 for BF16) -> a new float32 array."""
    if dtype == "BF16":
        out = raw.astype(np.uint32)
        out <<= np.uint32(16)
        return out.view(np.float32)
    return raw.astype(np.float32)


class Checkpoint:
    def __init__(self, root: Path, config: dict, tensors: list[TensorInfo], files: list[str]):
        self.root = root
        self.config = config
        self.tensors = tensors
        self.files = files
        self._by_name = {t.name: t for t in tensors}

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def info(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self.root}") from None

    def _raw(self, info: TensorInfo) -> np.memmap:
        """A read-only map of the tensor's bytes; drop it soon (it pins pages)."""
        np_dtype = SUPPORTED_DTYPES[info.dtype]
        shape = info.shape if info.shape else (1,)
        return np.memmap(
            self.root / info.file, dtype=np_dtype, mode="r", offset=info.start, shape=shape
        )

    def read(self, name: str) -> np.ndarray:
        info = self.info(name)
        out = to_float32(self._raw(info), info.dtype)
        return out.reshape(info.shape)

    def read_rows(self, name: str, rows: Rows) -> np.ndarray:
        """Rows (first axis) of a tensor; only the pages holding them are read."""
        info = self.info(name)
        if info.ndim < 1:
            raise ValueError(f"{name} is a scalar; it has no rows")
        return to_float32(self._raw(info)[_rows_index(rows)], info.dtype)

    def read_expert(self, name: str, expert: int) -> np.ndarray:
        """One expert [out, in] of a stacked [E, out, in] tensor."""
        info = self._stacked(name, expert)
        return to_float32(self._raw(info)[expert], info.dtype)

    def read_expert_rows(self, name: str, expert: int, rows: Rows) -> np.ndarray:
        info = self._stacked(name, expert)
        return to_float32(self._raw(info)[expert][_rows_index(rows)], info.dtype)

    def _stacked(self, name: str, expert: int) -> TensorInfo:
        info = self.info(name)
        if info.ndim != 3:
            raise ValueError(f"{name} has shape {info.shape}; stacked experts are [E, out, in]")
        if not 0 <= expert < info.shape[0]:
            raise IndexError(f"expert {expert} out of range for {name} with {info.shape[0]}")
        return info

    def fingerprint(self) -> str:
        """sha256 over each shard's name, size and header bytes, in sorted order."""
        digest = hashlib.sha256()
        for file in self.files:
            path = self.root / file
            with open(path, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = fh.read(length)
            digest.update(f"{file}\0{path.stat().st_size}\0".encode())
            digest.update(header)
        return digest.hexdigest()


def _rows_index(rows: Rows) -> slice | np.ndarray:
    if isinstance(rows, slice):
        return rows
    return np.asarray(rows, dtype=np.int64)


def _read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where tensor data starts) of one safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"truncated safetensors file {path.name}: {size} bytes")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER or 8 + length > size:
            raise CheckpointError(
                f"truncated or corrupt safetensors file {path.name}: header of {length} bytes "
                f"does not fit in {size} bytes"
            )
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt safetensors header in {path.name}: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors header in {path.name}: not a JSON object")
    return header, 8 + length


def _shard_tensors(root: Path, file: str) -> list[TensorInfo]:
    path = root / file
    header, data_start = _read_header(path)
    size = path.stat().st_size
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"corrupt header entry for {name} in {file}") from None
        if dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(
                f"unsupported dtype {dtype} of tensor {name} in {file} "
                f"(supported: {', '.join(SUPPORTED_DTYPES)}; is the model already quantized?)"
            )
        itemsize = np.dtype(SUPPORTED_DTYPES[dtype]).itemsize
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise CheckpointError(f"corrupt header entry for {name} in {file}: size mismatch")
        if data_start + end > size:
            raise CheckpointError(
                f"truncated shard {file}: {name} needs {data_start + end} bytes, file has {size}"
            )
        out.append(TensorInfo(name, dtype, shape, file, data_start + begin, end - begin))
    return out


def _shard_files(root: Path) -> tuple[list[str], dict[str, str] | None]:
    """Shard file names and, for an index, its tensor -> file map."""
    index_path = root / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(f"corrupt index {INDEX_NAME} in {root}") from None
        files = sorted(set(weight_map.values()))
        for file in files:
            if not (root / file).is_file():
                raise CheckpointError(f"{INDEX_NAME} names a missing shard: {root / file}")
        return files, weight_map
    files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for pattern in ("*.bin", "*.pt") for p in root.glob(pattern))
        hint = f" (found {other[0]}; only safetensors is read)" if other else ""
        raise CheckpointError(f"no safetensors weights in {root}{hint}")
    return files, None


def open_checkpoint(model_dir: str | os.PathLike | Checkpoint) -> Checkpoint:
    if isinstance(model_dir, Checkpoint):  # already open, e.g. a folded view (folded.py)
        return model_dir
    root = Path(model_dir).expanduser()
    from .gguf_model import is_gguf_source, open_source

    if is_gguf_source(root):  # a folder standing for GGUF files (gguf_model.py)
        return open_source(root)
    if not root.is_dir():
        raise CheckpointError(f"not a model directory: {root} (no such directory)")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"not a model directory: {root} has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt config.json in {root}: {exc}") from None
    files, weight_map = _shard_files(root)
    by_name: dict[str, TensorInfo] = {}
    for file in files:
        for info in _shard_tensors(root, file):
            if info.name in by_name:
                raise CheckpointError(
                    f"tensor {info.name} is stored twice ({by_name[info.name].file}, {file})"
                )
            by_name[info.name] = info
    if weight_map is not None:
        for name, file in sorted(weight_map.items()):
            if name not in by_name or by_name[name].file != file:
                raise CheckpointError(f"{INDEX_NAME} lists {name} in {file}, which lacks it")
    tensors = [by_name[n] for n in sorted(by_name)]
    return Checkpoint(root, config if isinstance(config, dict) else {}, tensors, files)

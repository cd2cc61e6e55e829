"""GGUF v2/v3 files and split sets: header, metadata, tensor infos, row reads.

Opening reads headers only. Tensor bytes are read on demand through a short-lived
np.memmap of exactly the rows asked for (as the safetensors reader does), so
memory stays bounded by one row block whatever the model's size.

A split set (`NAME-00001-of-00004.gguf`, llama.cpp's gguf-split) is found from
its first shard and read as one model; every shard must be present and carry the
same `split.count`, its own `split.no`, and no tensor twice.

    open_gguf(path) -> GGUFModel       (raises GGUFError, one line naming the file)
    GGUFModel.metadata, .files, .tensors (name -> GGUFTensor), .read_rows(tensor, rows)
    GGUFTensor: name, type (GGMLType), shape (numpy order: rows first), file, offset
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .gguf_quants import TYPES, GGMLType, rows_to_float32

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# Metadata value types: id -> struct format (None: string / array, read apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9

Rows = slice | Sequence[int] | np.ndarray


class GGUFError(Exception):
    """A GGUF file or split set that cannot be read; the message is one line."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: GGMLType
    shape: tuple[int, ...]  # numpy order: GGUF's ne reversed, the row length last
    file: Path
    offset: int  # absolute byte offset of the data in `file`

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.rows * self.type.row_bytes(self.cols)


class _Cursor:
    """Sequential little-endian reads over a file's bytes, with truncation checks."""

    def __init__(self, data: memoryview | bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise GGUFError(f"truncated GGUF file {self.path.name}: header runs past its "
                            f"{len(self.data)} bytes")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.unpack("<Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="surrogateescape")

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in _NUMPY:
                size = np.dtype(_NUMPY[item]).itemsize
                return np.frombuffer(self.take(count * size), dtype=_NUMPY[item]).tolist()
            return [self.value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise GGUFError(f"corrupt GGUF file {self.path.name}: unknown metadata type {kind}")
        return self.unpack(_SCALARS[kind])


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict
    tensors: list[GGUFTensor]
    header_bytes: int  # where tensor data starts


def read_header(path: Path) -> GGUFFile:
    """Magic, version, metadata and tensor infos of one GGUF file (no tensor data)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        # Headers are small next to the data, but vocabularies can take megabytes.
        head = fh.read(min(size, 64 * 2**20))
    cur = _Cursor(head, path)
    if size < 24 or head[:4] != MAGIC:
        raise GGUFError(f"{path.name} is not a GGUF file (bad magic {head[:4]!r})")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in VERSIONS:
        raise GGUFError(f"{path.name}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    try:
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            ne = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            infos.append((name, ne, cur.unpack("<I"), cur.unpack("<Q")))
    except GGUFError:
        if len(head) < size:  # the header is longer than what we read: read it all
            raise GGUFError(f"{path.name}: GGUF header larger than 64 MiB") from None
        raise
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = [_tensor(path, size, data_start, *info) for info in infos]
    return GGUFFile(path, version, metadata, tensors, data_start)


def _tensor(path: Path, size: int, data_start: int, name: str, ne: list[int], type_id: int,
            offset: int) -> GGUFTensor:
    if type_id not in TYPES:
        supported = ", ".join(t.name for t in TYPES.values())
        raise GGUFError(f"{path.name}: tensor {name} has GGML type {type_id}, which is not "
                        f"supported (supported: {supported})")
    gtype = TYPES[type_id]
    tensor = GGUFTensor(name, gtype, tuple(reversed(ne)), path, data_start + offset)
    if tensor.cols % gtype.block_size:
        raise GGUFError(f"{path.name}: tensor {name} rows of {tensor.cols} are not whole "
                        f"{gtype.name} blocks of {gtype.block_size}")
    if tensor.offset + tensor.nbytes > size:
        raise GGUFError(f"truncated GGUF file {path.name}: tensor {name} needs bytes up to "
                        f"{tensor.offset + tensor.nbytes}, the file has {size}")
    return tensor


class GGUFModel:
    """One model: a single GGUF file or every shard of a split set."""

    def __init__(self, files: list[GGUFFile]):
        self.files = [f.path for f in files]
        self.header_bytes = [f.header_bytes for f in files]
        self.version = files[0].version
        self.metadata = {k: v for k, v in files[0].metadata.items() if not k.startswith("split.")}
        self.tensors: dict[str, GGUFTensor] = {}
        for f in files:
            for t in f.tensors:
                if t.name in self.tensors:
                    raise GGUFError(f"tensor {t.name} is stored twice "
                                    f"({self.tensors[t.name].file.name}, {f.path.name})")
                self.tensors[t.name] = t

    @property
    def arch(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.files[0].name} has no general.architecture")
        return arch

    def tensor(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.files[0].name}: tensor {name} is missing") from None

    def read_rows(self, tensor: GGUFTensor, rows: Rows, first_row: int = 0) -> np.ndarray:
        """float32 rows of the tensor viewed as [rows, cols]; `first_row` offsets the
        indices (one expert's rows of a stacked tensor)."""
        gtype, cols = tensor.type, tensor.cols
        if gtype.quantized:
            raw = np.memmap(tensor.file, dtype=np.uint8, mode="r", offset=tensor.offset,
                            shape=(tensor.rows, gtype.row_bytes(cols)))
        else:
            raw = np.memmap(tensor.file, dtype=gtype.float_dtype, mode="r",
                            offset=tensor.offset, shape=(tensor.rows, cols))
        if isinstance(rows, slice):
            start, stop, step = rows.indices(tensor.rows - first_row)
            picked = raw[first_row + start : first_row + stop : step]
        else:
            picked = raw[np.asarray(rows, dtype=np.int64) + first_row]
        return rows_to_float32(np.asarray(picked), gtype, cols)


def shard_paths(first: Path) -> list[Path]:
    """All shards of the split set `first` belongs to (just [first] if unsplit)."""
    match = SPLIT_NAME.match(first.name)
    if match is None:
        return [first]
    count = int(match["count"])
    if int(match["no"]) != 1:
        raise GGUFError(f"{first.name} is shard {int(match['no'])} of {count}; "
                        f"pass the first shard ({match['stem']}-00001-of-{match['count']}.gguf)")
    paths = [first.with_name(f"{match['stem']}-{i:05d}-of-{match['count']}.gguf")
             for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise GGUFError(f"incomplete GGUF split set: {missing[0]} is missing "
                        f"({len(missing)} of {count} shards absent in {first.parent})")
    return paths


def open_gguf(path: str | Path) -> GGUFModel:
    first = Path(path).expanduser()
    if not first.is_file():
        raise GGUFError(f"no such GGUF file: {first}")
    paths = shard_paths(first)
    files = [read_header(p) for p in paths]
    if len(files) > 1:
        _check_split(files)
    return GGUFModel(files)


def _check_split(files: list[GGUFFile]) -> None:
    count = len(files)
    arch = files[0].metadata.get("general.architecture")
    total = files[0].metadata.get("split.tensors.count")
    for i, f in enumerate(files):
        no, n = f.metadata.get("split.no"), f.metadata.get("split.count")
        if no != i or n != count:
            raise GGUFError(f"{f.path.name} does not belong to this split set: it says shard "
                            f"{no} of {n}, expected {i} of {count}")
        if i == 0 or "general.architecture" not in f.metadata:
            continue
        if f.metadata["general.architecture"] != arch:
            raise GGUFError(f"{f.path.name} is a shard of another model "
                            f"({f.metadata['general.architecture']}, not {arch})")
    stored = sum(len(f.tensors) for f in files)
    if total is not None and stored != total:
        raise GGUFError(f"GGUF split set {files[0].path.name}: {stored} tensors in {count} "
                        f"shards, the first shard announces {total}")

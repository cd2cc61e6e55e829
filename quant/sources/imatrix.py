"""llama.cpp importance matrices (imatrix files) -> input second moments by HF name.

llama.cpp's `llama-imatrix` runs a model over text and sums, for every weight
matrix it multiplies, the squares of each input channel (x_j^2) and the number of
tokens it saw. Two file formats exist:

* GGUF (current): tensors `<gguf tensor>.in_sum2` (numpy [n_mat, n_in], float32
  sums of x^2) and `<gguf tensor>.counts` ([n_mat, 1], tokens seen); n_mat is the
  number of experts for a stacked `*_exps` tensor, else 1. Optional `.in_sum`
  (sums of x) is ignored. Metadata: general.type = "imatrix", imatrix.datasets,
  imatrix.chunk_count, imatrix.chunk_size.
* legacy .dat: int32 n_entries; per entry int32 name length, name, int32 ncall,
  int32 nval, nval float32 values (mean x^2 times ncall, experts one after the
  other); then optionally int32 chunk count, int32 length + dataset name. An
  expert that saw no token is stored as all 1.0 * ncall.

Either way the moments are mean x^2 per channel (per expert for stacked experts;
an expert that saw no token gets the mean of the others), keyed by the HF weight
name through gguf_names (the one GGUF <-> HF name map) - the dict moments.py
produces, which the budget's objective, the group fit and AWQ consume.

The GGUF form is read with our own reader (gguf_file.py); the `gguf` package is a
test-only dependency.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import gguf_names
from .gguf_file import GGUFError, open_gguf

Moments = dict[str, np.ndarray]
_IN_SUM2, _COUNTS = ".in_sum2", ".counts"


class ImatrixError(ValueError):
    """An imatrix file that cannot be read or does not fit the model; one line."""


@dataclass(frozen=True)
class ImatrixEntry:
    means: np.ndarray  # [n_mat, n_in] float64: mean x^2 per matrix (expert)
    seen: np.ndarray  # [n_mat] bool: the matrix saw at least one token


@dataclass(frozen=True)
class ImatrixFile:
    path: Path
    format: str  # "gguf" or "dat"
    entries: dict[str, ImatrixEntry]  # GGUF tensor name -> sums
    datasets: tuple[str, ...] = ()
    chunk_count: int | None = None


def read_imatrix(path: str | Path) -> ImatrixFile:
    """Read either format (told apart by the GGUF magic)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ImatrixError(f"no such imatrix file: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)


def _read_gguf(path: Path) -> ImatrixFile:
    try:
        model = open_gguf(path)
        kind = model.metadata.get("general.type")
        names = sorted(n[: -len(_IN_SUM2)] for n in model.tensors if n.endswith(_IN_SUM2))
        if not names:
            what = f"general.type {kind!r}" if kind else "no .in_sum2 tensors"
            raise ImatrixError(f"{path.name} is not a llama.cpp imatrix ({what})")
        entries = {}
        for name in names:
            if name + _COUNTS not in model.tensors:
                raise ImatrixError(f"imatrix {path.name}: {name} has sums but no counts")
            sums = model.read_rows(model.tensors[name + _IN_SUM2], slice(None))
            counts = model.read_rows(model.tensors[name + _COUNTS], slice(None)).reshape(-1)
            if counts.size != sums.shape[0]:
                raise ImatrixError(f"imatrix {path.name}: {name} has {sums.shape[0]} matrices "
                                   f"but {counts.size} counts")
            seen = counts > 0
            means = sums.astype(np.float64) / np.where(seen, counts, 1.0)[:, None]
            entries[name] = ImatrixEntry(means, seen)
    except GGUFError as exc:
        raise ImatrixError(f"imatrix {path.name}: {exc}") from None
    datasets = model.metadata.get("imatrix.datasets") or ()
    chunks = model.metadata.get("imatrix.chunk_count")
    return ImatrixFile(path, "gguf", entries, tuple(str(d) for d in datasets),
                       None if chunks is None else int(chunks))


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ImatrixError(f"imatrix {self.path.name} is truncated or not an imatrix "
                               f"(needs byte {self.pos + n}, has {len(self.data)})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _read_dat(path: Path) -> ImatrixFile:
    r = _Reader(path.read_bytes(), path)
    n_entries = r.int32()
    if n_entries < 1:
        raise ImatrixError(f"imatrix {path.name} has no entries (or is not an imatrix)")
    entries = {}
    for _ in range(n_entries):
        name = r.take(r.int32()).decode("utf-8", errors="replace")
        ncall, nval = r.int32(), r.int32()
        values = np.frombuffer(r.take(4 * nval), dtype="<f4").astype(np.float64)
        entries[name] = _dat_entry(values, ncall, name, path)
    chunk_count, datasets = None, ()
    if r.left >= 4:
        chunk_count = r.int32()
        if r.left >= 4:
            datasets = (r.take(r.int32()).decode("utf-8", errors="replace"),)
    return ImatrixFile(path, "dat", entries, datasets, chunk_count)


def _dat_entry(values: np.ndarray, ncall: int, name: str, path: Path) -> ImatrixEntry:
    """Legacy values are mean * ncall; the expert count is not stored, so it is read
    from the model later (`_per_matrix`): here the entry is one flat matrix."""
    if ncall <= 0:
        raise ImatrixError(f"imatrix {path.name}: {name} has ncall {ncall}")
    return ImatrixEntry(values[None, :] / ncall, np.ones(1, dtype=bool))


def _per_matrix(entry: ImatrixEntry, n_mat: int, legacy: bool) -> ImatrixEntry:
    """One flat matrix of values split into n_mat experts (a legacy entry, or a GGUF
    one from a merge of an old file: one count for all experts). In a legacy file a
    block of exactly 1.0 everywhere is llama.cpp's marker for an expert that saw nothing."""
    if entry.means.shape[0] == n_mat or entry.means.shape[0] != 1 or entry.means.size % n_mat:
        return entry
    means = entry.means.reshape(n_mat, -1)
    seen = ~np.all(means == 1.0, axis=1) if legacy else np.repeat(entry.seen, n_mat)
    return ImatrixEntry(means, seen)


@dataclass
class ImatrixMoments:
    moments: Moments  # HF weight name -> [n_in] or [n_experts, n_in], float32
    covered: list[str] = field(default_factory=list)  # MLX modules the file covers
    missing: list[str] = field(default_factory=list)  # modules it does not
    unknown: list[str] = field(default_factory=list)  # entries naming no tensor of the model
    source: str = ""

    def warning(self) -> str | None:
        """One line when the file covers the model only in part."""
        if not self.missing and not self.unknown:
            return None
        parts = [f"imatrix {self.source}: {len(self.covered)} modules matched, "
                 f"{len(self.missing)} missing"]
        if self.missing:
            parts.append(f" (e.g. {self.missing[0]}; they keep self-generated or flat moments)")
        if self.unknown:
            parts.append(f"; {len(self.unknown)} entries name no tensor of this model "
                         f"(e.g. {self.unknown[0]}), ignored")
        return "".join(parts)


def gguf_arch(model_type: str) -> str:
    for arch, mtype in gguf_names.MODEL_TYPES.items():
        if mtype == model_type:
            return arch
    raise ImatrixError(f"no GGUF tensor names are known for model type {model_type!r} "
                       f"(imatrix supported for: {', '.join(gguf_names.MODEL_TYPES.values())})")


def imatrix_moments(path: str | Path, config: dict, shapes: dict[str, tuple[int, ...]],
                    name_map) -> ImatrixMoments:
    """The moments an imatrix file gives for the model (config, HF shapes, NameMap).

    Raises ImatrixError when no entry matches or shapes disagree (another model)."""
    from ..mlx_names import tied_embeddings

    file = read_imatrix(path)
    arch = gguf_arch(config.get("model_type", ""))
    found: dict[str, list[np.ndarray]] = {}
    unknown = []
    for gname, entry in sorted(file.entries.items()):
        placed = _place(arch, gname, entry, shapes, file)
        if placed is None:
            unknown.append(gname)
        for hf, means in (placed or {}).items():
            perm = _hf_channels(config, hf)
            found.setdefault(hf, []).append(means if perm is None else means[..., perm])
    if not found:
        example = next(iter(sorted(file.entries)), "none")
        raise ImatrixError(f"imatrix {file.path.name} matches no tensor of this "
                           f"{config.get('model_type')} model ({len(file.entries)} entries, "
                           f"e.g. {example}): it was made for another model")
    # Both halves of a fused gate_up_proj see the same input: average them.
    moments = {hf: np.mean(v, axis=0).astype(np.float32) for hf, v in sorted(found.items())}
    row_lookup = None if tied_embeddings(config) else "embed_tokens.weight"
    result = ImatrixMoments(moments, unknown=unknown, source=file.path.name)
    for t in name_map.quantizable():
        if row_lookup and t.sources[0].endswith(row_lookup):
            continue  # an untied embedding is a row lookup: llama.cpp never records it
        bucket = result.covered if all(s in moments for s in t.sources) else result.missing
        bucket.append(t.module)
    return result


def _place(arch: str, gname: str, entry: ImatrixEntry, shapes: dict[str, tuple[int, ...]],
           file: ImatrixFile) -> dict[str, np.ndarray] | None:
    """HF name -> moments for one imatrix entry; None when the model lacks the tensor.
    Raises when the tensor exists with another input size."""
    try:
        mapping = gguf_names.lookup(arch, gname)
    except gguf_names.UnknownTensorName:
        return None
    if mapping is None:
        return None
    legacy = file.format == "dat"
    if mapping.per_expert:
        n_mat = _experts_in_model(mapping.hf, shapes)
        if n_mat == 0:
            return None
        entry = _checked(_per_matrix(entry, n_mat, legacy), gname, mapping.hf.format(e=0),
                         shapes[mapping.hf.format(e=0)], n_mat, file)
        if not entry.seen.any():
            return {}
        means = _fill_unseen(entry)
        return {mapping.hf.format(e=e): means[e] for e in range(n_mat)}
    if mapping.hf not in shapes:
        return None
    shape = shapes[mapping.hf]
    n_mat = shape[0] if len(shape) == 3 else 1
    entry = _checked(_per_matrix(entry, n_mat, legacy), gname, mapping.hf, shape, n_mat, file)
    if not entry.seen.any():
        return {}
    means = _fill_unseen(entry)
    return {mapping.hf: means if len(shape) == 3 else means[0]}


def _hf_channels(config: dict, hf: str) -> np.ndarray | None:
    """The input-channel order llama.cpp changed (GGUF index of each HF channel): only
    Qwen3.5's linear-attention out_proj, whose value heads it tiles (gguf_source.py)."""
    if not hf.endswith("linear_attn.out_proj.weight"):
        return None
    from .gguf_source import v_head_perm

    t = config.get("text_config", config)
    n_k, n_v = t["linear_num_key_heads"], t["linear_num_value_heads"]
    return None if n_k == n_v else v_head_perm(n_k, n_v, t["linear_value_head_dim"])


def _experts_in_model(template: str, shapes: dict[str, tuple[int, ...]]) -> int:
    n = 0
    while template.format(e=n) in shapes:
        n += 1
    return n


def _checked(entry: ImatrixEntry, gname: str, hf: str, shape: tuple[int, ...], n_mat: int,
             file: ImatrixFile) -> ImatrixEntry:
    if entry.means.shape != (n_mat, shape[-1]):
        got = " x ".join(str(n) for n in entry.means.shape)
        raise ImatrixError(f"imatrix {file.path.name} was made for another model: {gname} holds "
                           f"{got} values, this model's {hf} needs {n_mat} x {shape[-1]} "
                           "(matrices x input channels)")
    return entry


def _fill_unseen(entry: ImatrixEntry) -> np.ndarray:
    """Experts that saw no token take the mean of those that did."""
    means = entry.means.copy()
    if entry.seen.all():
        return means
    means[~entry.seen] = means[entry.seen].mean(axis=0)
    return means

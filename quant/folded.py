"""A checkpoint whose tensors are read pre-scaled: the folds applied as they stream.

`FoldedCheckpoint` has the interface of sources/checkpoint.py's Checkpoint, so
analysis and conversion read through it unchanged and memory stays a row block:
each HF tensor read is multiplied by its column factors (consumers of a fold
group: W * s), its row factors (producers: rows / s, their bias too) or, for a
norm weight, divided by s. Folding is per HF tensor, traced through mlx_lm's
name map, so a stacked [E, 2I, H] gate_up_proj gets its up half's rows scaled per
expert while its gate half is only column-scaled.

Norm weights may be stored with an offset that mlx_lm's sanitize adds (Qwen3.5
and Qwen3-Next checkpoints store w for an effective 1 + w). The offset is read
off sanitize itself, by passing it zeros and ones, so the stored value becomes
(c + w) / s - c and the folded model stays exact; a norm whose sanitize is not
w + c is not folded.

`fold_moments` gives the moments the scaled modules see: d / s^2. `save_folds`
writes the factors beside a converted checkpoint (FOLDS_FILE) and `load_folds`
applies them to another view of the same source, so `swan-quant validate` can
compare a pre-scaled build with its float source folded the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from .fold_groups import FoldGroup, fold_groups
from .mlx_names import NameMap, build_model, build_name_map, checkpoint_shapes
from .prescale import DEFAULT_SETTING, GroupScale, Method, SearchSetting, group_scales
from .sources.checkpoint import Checkpoint, Rows, _rows_index, open_checkpoint

_MX_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "F64": mx.float32}


FOLDS_FILE = "swan-folds.npz"  # not *.safetensors: loaders glob those as weights


class FoldError(ValueError):
    """The scales cannot be folded into this checkpoint (a bug guard, one line)."""


class FoldedCheckpoint(Checkpoint):
    def __init__(self, base: Checkpoint, cols: dict[str, np.ndarray],
                 rows: dict[str, np.ndarray], norms: dict[str, tuple[np.ndarray, float]]):
        super().__init__(base.root, base.config, base.tensors, base.files)
        self.base = base
        self.cols, self.rows, self.norms = cols, rows, norms
        self.chosen: dict[str, GroupScale] = {}  # the search's result, for the log

    # -- reads: the base's values times the factors -----------------------------

    def read(self, name: str) -> np.ndarray:
        out = self.base.read(name)
        if name in self.norms:
            s, offset = self.norms[name]
            return ((out + offset) / s - offset).astype(np.float32)
        row, col = self.rows.get(name), self.cols.get(name)
        if row is not None:
            out = out * (row if out.ndim == row.ndim else row[..., None])
        if col is not None:
            out = out * (col[..., None, :] if col.ndim == 2 else col)
        return out.astype(np.float32, copy=False)

    def read_rows(self, name: str, rows: Rows) -> np.ndarray:
        out = self.base.read_rows(name, rows)
        if name in self.norms or (name in self.rows and out.ndim == 1):
            return self.read(name)[_rows_index(rows)]
        return self._scale(out, self.rows.get(name), self.cols.get(name), rows)

    def read_expert(self, name: str, expert: int) -> np.ndarray:
        return self.read_expert_rows(name, expert, slice(None))

    def read_expert_rows(self, name: str, expert: int, rows: Rows) -> np.ndarray:
        out = self.base.read_expert_rows(name, expert, rows)
        row, col = self.rows.get(name), self.cols.get(name)
        return self._scale(out, None if row is None else row[expert],
                           None if col is None else (col[expert] if col.ndim == 2 else col), rows)

    @staticmethod
    def _scale(out: np.ndarray, row: np.ndarray | None, col: np.ndarray | None,
               rows: Rows) -> np.ndarray:
        if row is not None:
            out = out * row[_rows_index(rows)][:, None]
        if col is not None:
            out = out * col
        return out.astype(np.float32, copy=False)

    def lazy_arrays(self, names: list[str]) -> dict[str, mx.array]:
        """Float tensors for mlx_names.float_tensors: folded ones computed here (norms and
        biases: small), the rest lazily from the base as it would read them."""
        changed = [n for n in names if n in self.norms or n in self.rows]
        out = {n: mx.array(self.read(n)).astype(_MX_DTYPES[self.info(n).dtype])
               for n in changed}
        out.update(_lazy_base(self.base, [n for n in names if n not in out]))
        return out

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.base.fingerprint().encode())
        for table in (self.cols, self.rows):
            for name in sorted(table):
                digest.update(name.encode() + table[name].tobytes())
        for name in sorted(self.norms):
            digest.update(name.encode() + self.norms[name][0].tobytes())
        return digest.hexdigest()


def _lazy_base(base: Checkpoint, names: list[str]) -> dict[str, mx.array]:
    if hasattr(base, "lazy_arrays"):
        return base.lazy_arrays(names)
    out: dict[str, mx.array] = {}
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(base.info(name).file, []).append(name)
    for file, file_names in sorted(by_file.items()):
        loaded = mx.load(str(Path(base.root) / file))  # lazy: nothing read yet
        out.update({n: loaded[n] for n in file_names})
    return out


def fold(base: Checkpoint, name_map: NameMap, groups: list[FoldGroup],
         scales: dict[str, GroupScale]) -> FoldedCheckpoint:
    """The view of `base` with every group's scale folded in (s = 1 groups skipped)."""
    cols: dict[str, np.ndarray] = {}
    rows: dict[str, np.ndarray] = {}
    norms: dict[str, tuple[np.ndarray, float]] = {}
    offsets = None
    for g in groups:
        chosen = scales.get(g.name)
        if chosen is None or chosen.alpha == 0.0:
            continue
        if g.norm is not None:
            offsets = offsets if offsets is not None else norm_offsets(base, name_map)
            if g.norm not in offsets:
                continue  # its sanitize is not w + c: leave the group unscaled
        s = chosen.scale.astype(np.float64)
        s_cols = s[g.expand] if g.expand is not None else s
        for t, slot in g.consumers:
            for piece in t.slots[slot]:
                _set(base, cols, piece.hf_name, piece.expert, None, s_cols, "column", g.name)
        if g.norm is not None:
            norms[g.norm] = (s.astype(np.float32), offsets[g.norm])
        else:
            t, slot = g.producer
            start = 0
            for piece in t.slots[slot]:
                part = 1.0 / s[start:start + piece.rows]
                _set(base, rows, piece.hf_name, piece.expert, (piece.start, piece.stop), part,
                     "row", g.name)
                bias = piece.hf_name.removesuffix(".weight") + ".bias"
                if piece.hf_name.endswith(".weight") and bias in base:
                    _set(base, rows, bias, None, (piece.start, piece.stop), part, "row", g.name)
                start += piece.rows
    as32 = {k: v.astype(np.float32) for k, v in cols.items()}
    return FoldedCheckpoint(base, as32, {k: v.astype(np.float32) for k, v in rows.items()},
                            norms)


def _set(base: Checkpoint, table: dict[str, np.ndarray], name: str, expert: int | None,
         span: tuple[int, int] | None, values: np.ndarray, axis: str, group: str) -> None:
    """Write `values` into the factor of HF tensor `name` (for expert / row span)."""
    shape = base.info(name).shape
    if name not in table:
        lead = shape[:1] if len(shape) == 3 else ()
        size = shape[-1] if axis == "column" else shape[-2 if len(shape) >= 2 else -1]
        table[name] = np.ones((*lead, size))
    target = table[name] if expert is None else table[name][expert]
    index = slice(None) if span is None else slice(*span)
    if axis == "column" and not np.all(target[index] == 1.0):
        if not np.allclose(target[index], values):  # shared tensor, two groups disagree
            raise FoldError(f"{name} gets two different column scales ({group})")
    target[index] = values


def norm_offsets(base: Checkpoint, name_map: NameMap) -> dict[str, float]:
    """HF norm name -> c where mlx_lm's sanitize maps a stored norm w to w + c."""
    floats = {t.sources[0]: t.key for t in name_map.floats() if len(t.sources) == 1}
    model = build_model(base.config)
    probes = []
    for value in (0.0, 1.0):
        fake = {t.name: mx.full(t.shape, value) for t in base.tensors}
        probes.append(model.sanitize(fake))
    out = {}
    for hf, key in floats.items():
        if hf.endswith("norm.weight") and key in probes[0]:
            zero, one = np.array(probes[0][key]), np.array(probes[1][key])
            c = float(zero.flat[0])
            if np.all(zero == c) and np.all(one == c + 1.0):
                out[hf] = c
    return out


def fold_moments(moments: dict[str, np.ndarray], folded: FoldedCheckpoint
                 ) -> dict[str, np.ndarray]:
    """Moments of each scaled module's input: d / s^2 (the others unchanged)."""
    out = {}
    for name, d in moments.items():
        col = folded.cols.get(name)
        out[name] = d if col is None else (np.asarray(d) / np.square(col)).astype(np.float32)
    return out


def prescaled(model_dir: str | Path | Checkpoint, method: Method,
              moments: dict[str, np.ndarray] | None = None,
              setting: SearchSetting = DEFAULT_SETTING) -> FoldedCheckpoint:
    """model_dir's checkpoint with `method`'s scales (prescale.py) folded in."""
    base = open_checkpoint(model_dir)
    name_map = build_name_map(base.config, checkpoint_shapes(base))
    groups = fold_groups(base.config, name_map)
    scales = group_scales(base, groups, method, moments, setting)
    view = fold(base, name_map, groups, scales)
    view.chosen = scales
    return view


def describe(view: FoldedCheckpoint) -> str:
    """One line for the log: how many groups were scaled and the error they save."""
    chosen = view.chosen
    scaled = [g for g in chosen.values() if g.alpha > 0]
    before = sum(g.error_unscaled for g in chosen.values())
    after = sum(g.error for g in chosen.values())
    saved = f", weighted error {after / before:.3f}x of unscaled" if before else ""
    return f"pre-scaled {len(scaled)} of {len(chosen)} fold groups{saved}"


def save_folds(view: FoldedCheckpoint, path: Path) -> None:
    """The view's factors (HF tensor name -> column, row or norm factors, and each
    norm's stored offset), written whole or not at all."""
    arrays = {f"cols|{n}": v for n, v in view.cols.items()}
    arrays.update({f"rows|{n}": v for n, v in view.rows.items()})
    arrays.update({f"norms|{n}": s for n, (s, _) in view.norms.items()})
    offsets = {n: float(offset) for n, (_, offset) in view.norms.items()}
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(staging, norm_offsets=np.array(json.dumps(offsets)),
                 **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def load_folds(path: Path, base: Checkpoint) -> FoldedCheckpoint:
    """`base` (the float source a build was made from) with that build's folds."""
    with np.load(path, allow_pickle=False) as data:
        offsets = json.loads(str(data["norm_offsets"]))
        tables: dict[str, dict[str, np.ndarray]] = {"cols": {}, "rows": {}, "norms": {}}
        for key in data.files:
            kind, _, name = key.partition("|")
            if kind in tables:
                tables[kind][name] = data[key]
    missing = [n for table in tables.values() for n in table if n not in base]
    if missing:
        raise FoldError(f"{path.name} names {missing[0]}, which the reference does not have")
    norms = {n: (s, offsets[n]) for n, s in tables["norms"].items()}
    return FoldedCheckpoint(base, tables["cols"], tables["rows"], norms)

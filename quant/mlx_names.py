"""Hugging Face tensor names -> MLX parameters, as mlx_lm itself maps them.

mlx_lm loads a checkpoint by building the model class from config.json and
passing every stored tensor through the model's `sanitize()`: prefixes change
(`model.language_model.` -> `language_model.model.`), tied heads and MTP layers
are dropped, per-expert tensors are stacked into `switch_mlp`, a stacked
`experts.gate_up_proj` is split into `switch_mlp.gate_proj`/`up_proj`. Rather
than keep a hand-written table per architecture, we ask mlx_lm:

* the model is built from the config with lazy parameters (never evaluated, so
  an 8B model costs nothing) -> the exact parameter keys, shapes, and which
  modules can be quantized (`to_quantized`, as mlx_lm's loader checks);
* `sanitize()` is run on small int32 *probes* instead of the weights: each HF
  tensor of shape (..., rows, in) becomes (..., rows, 1) holding its id, or its
  row index, or its expert index. Whatever sanitize does (rename, drop, stack,
  split along rows) is read back from the probes it returns, so each output
  row is traced to (HF tensor, expert, row).

A quantizable weight must come out as runs of whole rows of HF tensors (what the
four supported families do), so it can be streamed row block by row block
without loading the model. Anything else is an error, never a guess. Float
tensors (norms, biases, conv1d, A_log, ...) may also be transformed in value by
sanitize (Qwen3.5 adds 1 to norms, moves conv1d axes): `float_tensors()` runs
the real sanitize on them, lazily, through `mx.load`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .sources.checkpoint import Checkpoint

_ID_STRIDE = 4  # ids are stored as 4*i + 1 so that arithmetic on a probe shows up


class NameMapError(ValueError):
    """The checkpoint cannot be mapped onto mlx_lm's model; one line for the user."""


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one HF tensor (of expert `expert` when it is stacked)."""

    hf_name: str
    expert: int | None
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class MlxTensor:
    key: str  # MLX parameter key, e.g. "model.layers.0.mlp.switch_mlp.up_proj.weight"
    shape: tuple[int, ...]
    module: str | None  # path of the quantizable module whose weight this is, else None
    sources: tuple[str, ...]  # HF tensors it is built from, sorted
    # Quantizable weights only: per slot (one for 2-D, one per expert for 3-D) the
    # runs of HF rows that make up the slot's [out, in] matrix, in order.
    slots: tuple[tuple[Piece, ...], ...] = ()

    @property
    def quantizable(self) -> bool:
        return self.module is not None


@dataclass(frozen=True)
class NameMap:
    model_type: str
    tensors: tuple[MlxTensor, ...]  # sorted by key
    dropped: tuple[str, ...]  # HF tensors that mlx_lm's sanitize discards (tied head, MTP)

    def quantizable(self) -> list[MlxTensor]:
        return [t for t in self.tensors if t.quantizable]

    def floats(self) -> list[MlxTensor]:
        return [t for t in self.tensors if not t.quantizable]

    def by_module(self) -> dict[str, MlxTensor]:
        return {t.module: t for t in self.tensors if t.module is not None}

    def modules_of(self) -> dict[str, list[str]]:
        """HF tensor name -> MLX module paths built from it (quantizable weights only)."""
        out: dict[str, list[str]] = {}
        for t in self.quantizable():
            for src in t.sources:
                out.setdefault(src, []).append(t.module)
        return out


def build_model(config: dict) -> nn.Module:
    """mlx_lm's model for `config`, parameters lazy (nothing is allocated)."""
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config=config)
    except ValueError as exc:
        raise NameMapError(str(exc)) from None
    return model_class(args_class.from_dict(config))


def build_name_map(
    config: dict, shapes: dict[str, tuple[int, ...]], model: nn.Module | None = None
) -> NameMap:
    """Trace every HF tensor (name -> shape, e.g. from a Checkpoint or an index) to the
    MLX parameters mlx_lm loads it into."""
    model = model if model is not None else build_model(config)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    quantizable = {
        path for path, m in model.named_modules() if path and hasattr(m, "to_quantized")
    }
    names = sorted(shapes)
    probes = [_sanitized_probes(model, names, shapes, kind) for kind in ("id", "row", "expert")]
    ids, rows, experts = probes
    if not (ids.keys() == rows.keys() == experts.keys()):
        raise NameMapError("mlx_lm's sanitize gives different names for different probes")
    unknown = sorted(set(ids) - set(expected))
    if unknown:
        raise NameMapError(
            f"{len(unknown)} tensor(s) map to no module of mlx_lm's "
            f"{config.get('model_type')} model, e.g. {unknown[0]}"
        )
    missing = sorted(set(expected) - set(ids))
    if missing:
        raise NameMapError(f"the checkpoint has no tensor for mlx_lm parameter {missing[0]}")
    tensors, used = [], set()
    for key in sorted(ids):
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in quantizable:
            t = _trace_weight(
                key, module, expected[key], (ids[key], rows[key], experts[key]), names, shapes
            )
        else:
            t = MlxTensor(key, expected[key], None, _float_sources(key, ids[key], names))
        used.update(t.sources)
        tensors.append(t)
    dropped = tuple(sorted(set(names) - used))
    return NameMap(config.get("model_type", ""), tuple(tensors), dropped)


def tied_embeddings(config: dict) -> bool:
    """Whether lm_head reuses the embedding (nested under text_config for Qwen3.5)."""
    return bool(config.get("text_config", config).get("tie_word_embeddings", False))


def checkpoint_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    return {t.name: t.shape for t in ckpt.tensors}


def float_tensors(ckpt: Checkpoint, name_map: NameMap, model: nn.Module) -> dict[str, mx.array]:
    """The float (unquantized) parameters as mlx_lm's sanitize makes them: lazy arrays
    backed by the checkpoint files; each is read when it is evaluated."""
    wanted = sorted({s for t in name_map.floats() for s in t.sources})
    if hasattr(ckpt, "lazy_arrays"):  # GGUF: read and transformed by the source itself
        return _sanitized_floats(ckpt.lazy_arrays(wanted), name_map, model)
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(ckpt.info(name).file, []).append(name)
    raw: dict[str, mx.array] = {}
    for file, file_names in sorted(by_file.items()):
        loaded = mx.load(str(Path(ckpt.root) / file))  # lazy: nothing read yet
        raw.update({n: loaded[n] for n in file_names})
    return _sanitized_floats(raw, name_map, model)


def _sanitized_floats(raw: dict[str, mx.array], name_map: NameMap, model: nn.Module
                      ) -> dict[str, mx.array]:
    out = model.sanitize(raw)
    keys = {t.key for t in name_map.floats()}
    if set(out) != keys:
        extra = sorted(set(out) ^ keys)
        raise NameMapError(f"mlx_lm's sanitize treats the float tensor {extra[0]} differently")
    for t in name_map.floats():
        if tuple(out[t.key].shape) != t.shape:
            raise NameMapError(f"{t.key} has shape {tuple(out[t.key].shape)}, expected {t.shape}")
    return out


def read_slot_rows(ckpt: Checkpoint, slot: tuple[Piece, ...], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a slot's [out, in] matrix, as float32."""
    parts, offset = [], 0
    for piece in slot:
        lo, hi = max(start, offset), min(stop, offset + piece.rows)
        if lo < hi:
            rows = slice(piece.start + lo - offset, piece.start + hi - offset)
            if piece.expert is None:
                parts.append(ckpt.read_rows(piece.hf_name, rows))
            else:
                parts.append(ckpt.read_expert_rows(piece.hf_name, piece.expert, rows))
        offset += piece.rows
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _probe(shape: tuple[int, ...], index: int, kind: str) -> mx.array:
    """A (..., rows, 1) int32 stand-in for a tensor of `shape`, holding one kind of label."""
    if len(shape) == 0:
        small = (1,)
    else:
        small = (*shape[:-1], 1)
    if kind == "id":
        return mx.full(small, _ID_STRIDE * index + 1, dtype=mx.int32)
    if kind == "row":
        if len(shape) < 2:
            return mx.zeros(small, dtype=mx.int32)
        col = mx.arange(shape[-2], dtype=mx.int32).reshape(shape[-2], 1)
        return mx.broadcast_to(col, small)
    if len(shape) == 3:  # expert index of a stacked [E, out, in] tensor
        return mx.broadcast_to(mx.arange(shape[0], dtype=mx.int32).reshape(-1, 1, 1), small)
    return mx.full(small, -1, dtype=mx.int32)


def _sanitized_probes(
    model: nn.Module, names: list[str], shapes: dict[str, tuple[int, ...]], kind: str
) -> dict[str, np.ndarray]:
    probes = {name: _probe(shapes[name], i, kind) for i, name in enumerate(names)}
    out = model.sanitize(probes) if hasattr(model, "sanitize") else probes
    result = {}
    for key, value in out.items():
        if value.dtype != mx.int32:  # sanitize did arithmetic on it
            value = value.astype(mx.float32)
        result[key] = np.array(value)
    return result


def _decode_ids(key: str, ids: np.ndarray, n_names: int, strict: bool) -> np.ndarray:
    if strict and (ids.dtype != np.int32 or np.any(ids % _ID_STRIDE != 1)):
        raise NameMapError(
            f"mlx_lm's sanitize changes the values of {key}; conversion cannot stream it"
        )
    decoded = np.floor_divide(np.asarray(ids, dtype=np.int64), _ID_STRIDE)
    if decoded.size and (decoded.min() < 0 or decoded.max() >= n_names):
        raise NameMapError(f"cannot trace {key} back to the checkpoint's tensors")
    return decoded


def _float_sources(key: str, ids: np.ndarray, names: list[str]) -> tuple[str, ...]:
    decoded = _decode_ids(key, ids, len(names), strict=False)
    return tuple(sorted({names[i] for i in np.unique(decoded)}))


def _trace_weight(
    key: str,
    module: str,
    shape: tuple[int, ...],
    labels: tuple[np.ndarray, np.ndarray, np.ndarray],
    names: list[str],
    shapes: dict[str, tuple[int, ...]],
) -> MlxTensor:
    ids, rows, experts = labels
    if len(shape) not in (2, 3) or ids.shape != (*shape[:-1], 1):
        raise NameMapError(
            f"mlx_lm builds {key} {shape} in a way conversion cannot stream "
            f"(traced shape {ids.shape})"
        )
    decoded = _decode_ids(key, ids, len(names), strict=True)
    n_slots = shape[0] if len(shape) == 3 else 1
    flat = (a.reshape(n_slots, shape[-2]) for a in (decoded, rows, experts))
    slots = tuple(
        _runs(key, names, i, r, e) for i, r, e in zip(*flat, strict=True)
    )
    for slot in slots:
        for piece in slot:
            if shapes[piece.hf_name][-1] != shape[-1]:
                raise NameMapError(f"{key} does not take whole rows of {piece.hf_name}")
    sources = tuple(sorted({p.hf_name for slot in slots for p in slot}))
    return MlxTensor(key, shape, module, sources, slots)


def _runs(key: str, names: list[str], ids, rows, experts) -> tuple[Piece, ...]:
    """Split one slot's row labels into runs of consecutive rows of one HF tensor."""
    breaks = np.flatnonzero(
        (ids[1:] != ids[:-1]) | (experts[1:] != experts[:-1]) | (rows[1:] != rows[:-1] + 1)
    )
    starts = np.concatenate([[0], breaks + 1])
    stops = np.concatenate([breaks + 1, [len(ids)]])
    pieces = []
    for a, b in zip(starts, stops, strict=True):
        expert = int(experts[a])
        pieces.append(
            Piece(names[int(ids[a])], None if expert < 0 else expert, int(rows[a]),
                  int(rows[a]) + int(b - a))
        )
    if not pieces:
        raise NameMapError(f"{key} has no rows")
    return tuple(pieces)

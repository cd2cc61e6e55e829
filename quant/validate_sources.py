"""The two sides of `swan-quant validate`: every MLX parameter of a checkpoint as rows
of float32 weights, read a block at a time.

A side is a dict MLX parameter key -> TensorView. A view knows its MLX shape, whether
the side keeps it in float, how it is stored (a label such as "4b/g64", "mxfp4",
"BF16"), and reads rows [r0, r1) of one slot (one expert of a stacked [E, out, in]
tensor; the only slot of a 2-D one) as float32. Nothing is read until asked, and a
read touches only the bytes of those rows, so memory stays at one row block however
large the model is.

Two kinds of side:
* an MLX checkpoint (what mlx_lm or swan-quant wrote; config.json has "quantization"):
  its safetensors are read directly (uint32 codes, scales, biases) and a row block is
  dequantized with mx.dequantize in the module's own mode, bits and group size;
* a source checkpoint (a Hugging Face safetensors folder, or GGUF through
  open_checkpoint): mlx_names maps its tensors onto the MLX parameters exactly as
  mlx_lm's loader does, so both sides are compared under MLX names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .sources.checkpoint import INDEX_NAME, CheckpointError, _read_header, to_float32

ReadRows = Callable[[int, int, int], np.ndarray]  # (slot, r0, r1) -> float32 [r1 - r0, cols]
_NUMPY = {"U32": np.uint32, "U8": np.uint8, "BF16": np.uint16, "F16": np.float16,
          "F32": np.float32, "F64": np.float64, "I32": np.int32}
_FLOATS = {"BF16", "F16", "F32", "F64"}
_GGUF_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


@dataclass(frozen=True)
class TensorView:
    key: str
    shape: tuple[int, ...]  # the MLX parameter's (dequantized) shape
    kept_float: bool
    storage: str  # "4b/g64", "mxfp4/g32", "BF16", "Q4_K" ...
    read: ReadRows

    @property
    def slots(self) -> int:
        return math.prod(self.shape[:-2]) if len(self.shape) > 2 else 1

    @property
    def rows(self) -> int:
        return self.shape[-2] if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1


def is_mlx_checkpoint(path: Path) -> bool:
    """A folder mlx_lm wrote: its config.json carries mlx_lm's "quantization" entry."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return "quantization" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


# --- MLX checkpoints ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int

    def rows(self, slot: int, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of slot `slot` of the tensor seen as [slots, rows, cols]."""
        shape = self.shape or (1,)
        cols = shape[-1]
        rows = shape[-2] if len(shape) > 1 else 1
        itemsize = np.dtype(_NUMPY[self.dtype]).itemsize
        offset = self.start + ((slot * rows + r0) * cols) * itemsize
        raw = np.memmap(self.file, dtype=_NUMPY[self.dtype], mode="r", offset=offset,
                        shape=(r1 - r0, cols))
        return np.array(raw)  # copy: the map is dropped at once


def _stored_tensors(root: Path) -> dict[str, _Stored]:
    index = root / INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {root}")
    out = {}
    for file in files:
        header, data_start = _read_header(root / file)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry.get("dtype") not in _NUMPY:
                raise CheckpointError(f"unsupported dtype {entry.get('dtype')} of {name} in {file}")
            begin = int(entry["data_offsets"][0])
            out[name] = _Stored(root / file, entry["dtype"], tuple(entry["shape"]),
                                data_start + begin)
    return out


def _as_mx(raw: np.ndarray, dtype: str) -> mx.array:
    if dtype == "BF16":
        return mx.array(raw).view(mx.bfloat16)
    return mx.array(raw)


def _settings(quant: dict, module: str) -> dict:
    """mlx_lm's rule: a module's own entry, else the top-level default."""
    own = quant.get(module)
    base = {"mode": quant.get("mode", "affine"), "bits": quant.get("bits"),
            "group_size": quant.get("group_size")}
    return {**base, **own} if isinstance(own, dict) else base


def mlx_side(root: Path) -> dict[str, TensorView]:
    """Every MLX parameter of an MLX checkpoint, quantized modules dequantized."""
    config = json.loads((root / "config.json").read_text())
    quant = config.get("quantization") or {}
    stored = _stored_tensors(root)
    views = {}
    for key, t in sorted(stored.items()):
        if key.endswith((".scales", ".biases")) and key.rsplit(".", 1)[0] + ".weight" in stored:
            continue
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and f"{module}.scales" in stored:
            views[key] = _quantized_view(key, t, stored, _settings(quant, module))
        elif t.dtype in _FLOATS:
            views[key] = TensorView(key, t.shape, True, t.dtype, _float_reader(t))
        else:
            raise CheckpointError(f"{key} in {root} is {t.dtype} without scales")
    return views


def _float_reader(t: _Stored) -> ReadRows:
    def read(slot: int, r0: int, r1: int) -> np.ndarray:
        return to_float32(t.rows(slot, r0, r1), t.dtype)

    return read


def _quantized_view(key: str, w: _Stored, stored: dict[str, _Stored], s: dict) -> TensorView:
    module = key.removesuffix(".weight")
    mode, bits, group = s.get("mode", "affine"), s.get("bits"), s.get("group_size")
    if not bits or not group:
        raise CheckpointError(f"config.json gives no bits/group_size for {module}")
    scales, biases = stored[f"{module}.scales"], stored.get(f"{module}.biases")
    shape = (*w.shape[:-1], w.shape[-1] * 32 // bits)

    def read(slot: int, r0: int, r1: int) -> np.ndarray:
        args = {"biases": _as_mx(biases.rows(slot, r0, r1), biases.dtype) if biases else None}
        out = mx.dequantize(mx.array(w.rows(slot, r0, r1)),
                            _as_mx(scales.rows(slot, r0, r1), scales.dtype), **args,
                            group_size=group, bits=bits, mode=mode, dtype=mx.float32)
        return np.array(out)

    label = f"{bits}b/g{group}" if mode == "affine" else f"{mode}/g{group}"
    return TensorView(key, shape, False, label, read)


# --- source checkpoints (HF safetensors, GGUF) --------------------------------------------


def source_side(path: Path, progress: bool = False, folds: Path | None = None,
                ) -> dict[str, TensorView]:
    """The MLX parameters a source checkpoint becomes, as mlx_lm's loader would build them;
    with `folds` (a pre-scaled build's FOLDS_FILE), with that build's factors folded in."""
    from .mlx_names import (
        build_model,
        build_name_map,
        checkpoint_shapes,
        float_tensors,
        read_slot_rows,
    )
    from .sources.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    if folds is not None:
        from .folded import load_folds

        ckpt = load_folds(folds, ckpt)
    model = build_model(ckpt.config)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt), model)
    floats = float_tensors(ckpt, name_map, model)  # lazy
    views = {}
    for t in name_map.tensors:
        storage, kept = _source_storage(ckpt, t.sources)
        if t.quantizable:
            def read(slot: int, r0: int, r1: int, t=t) -> np.ndarray:
                return read_slot_rows(ckpt, t.slots[slot], r0, r1)
        else:
            def read(slot: int, r0: int, r1: int, key=t.key) -> np.ndarray:
                array = floats[key]
                values = np.array(array.astype(mx.float32))
                return _as_3d(values)[slot, r0:r1]
        views[t.key] = TensorView(t.key, t.shape, kept, storage, read)
    return views


def _as_3d(values: np.ndarray) -> np.ndarray:
    shape = values.shape or (1,)
    cols = shape[-1]
    rows = shape[-2] if len(shape) > 1 else 1
    return values.reshape(-1, rows, cols)


def _source_storage(ckpt, sources: tuple[str, ...]) -> tuple[str, bool]:
    """How a source stores the tensors: its dtype, or a GGUF block type (not float)."""
    views = getattr(ckpt, "views", None)
    if views is None:
        return ckpt.info(sources[0]).dtype, True
    types = sorted({seg.tensor.type.name for s in sources for seg in views[s].segments})
    return "+".join(types), set(types) <= _GGUF_FLOAT_TYPES


def open_side(path: str | Path, folds: Path | None = None
              ) -> tuple[str, dict[str, TensorView]]:
    """("mlx" | "source", views) for a model folder or GGUF file; a source is read with
    `folds` applied when given (an MLX checkpoint cannot be: it is already quantized)."""
    root = Path(path).expanduser()
    if root.is_dir() and is_mlx_checkpoint(root):
        return "mlx", mlx_side(root)
    return "source", source_side(root, folds=folds)

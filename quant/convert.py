"""Plan -> MLX checkpoint that stock mlx_lm loads (`mlx_lm.load`, `mlx_lm.generate`).

Streaming: the output's shapes are known from the name map and the plan, so
the shard headers are written first and every quantized weight is then read,
fitted and written one row block at a time (one expert at a time for stacked
experts). Peak memory is a few row blocks plus the float tensors being copied,
never the model. Everything is written into a hidden staging folder beside the
target, checked by building the model through mlx_lm's own loader (lazily, so
every key, shape and quantization setting is checked without reading data),
and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import affine, fit, modes
from .mlx_names import (
    MlxTensor,
    NameMap,
    build_model,
    build_name_map,
    checkpoint_shapes,
    float_tensors,
    read_slot_rows,
)
from .plan import PLAN_FILE, Plan
from .progress import ProgressCallback, phase_progress
from .safetensors_out import (
    DEFAULT_MAX_SHARD_BYTES,
    DTYPE_OF_NAME,
    INDEX_NAME,
    OutTensor,
    ShardWriter,
    plan_shards,
    shard_names,
    to_storage,
    write_index,
)
from .sensitivity import importance_of
from .sources.checkpoint import Checkpoint, open_checkpoint
from .sources.gguf_keep import exact_groups, kept_scale_dtype

MANIFEST_FILE = "swan-manifest.json"
_BLOCK_ELEMENTS = 1 << 22  # weights read and fitted at once (16 MB of float32)
_CHECKPOINT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float32"}
_MX_DTYPES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32"}
_STORED = {"bfloat16": "bfloat16", "float16": "float16"}
# Files of a model folder that are weights or that we rewrite; everything else
# (tokenizer, chat template, generation config, licence) is copied.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_NOT_COPIED_NAMES = {"config.json", "model.safetensors.index.json", PLAN_FILE, MANIFEST_FILE}


class ConvertError(ValueError):
    """Bad input for a conversion (plan, target folder); one line for the user."""


@dataclass
class ConvertResult:
    out_dir: Path
    plan: Plan
    bytes_written: int
    # Relative RMS weight error per quantized module, after storage rounding.
    errors: dict[str, float] = field(default_factory=dict)


def check_plan(plan: Plan, name_map: NameMap) -> None:
    """Every quantizable module has exactly a valid decision; nothing else has one."""
    modules = name_map.by_module()
    for module in sorted(modules):
        if module not in plan.decisions:
            raise ConvertError(f"the plan has no decision for quantizable module {module}")
    for module, d in sorted(plan.decisions.items()):
        tensor = modules.get(module)
        if tensor is None:
            raise ConvertError(f"the plan decides {module}, which is no quantizable module")
        if d.in_dim != tensor.shape[-1] or d.params != int(np.prod(tensor.shape)):
            raise ConvertError(f"the plan's shape for {module} does not match the checkpoint")
        if d.quantized:
            if d.group_size is None:
                raise ConvertError(f"{module}: {d.bits} bits without a group size")
            try:
                _check_setting(d.bits, d.group_size, d.mode, tensor.shape[-1])
            except ValueError as exc:
                raise ConvertError(f"{module}: {exc}") from None


def _check_setting(bits: int, group_size: int, mode: str, in_dim: int) -> None:
    if mode == "affine":
        affine.check_setting(bits, group_size, in_dim)
        return
    modes.check_mode(mode, in_dim)
    if (bits, group_size) != (modes.BITS[mode], modes.GROUP_SIZE[mode]):
        raise ValueError(f"{mode} stores {modes.BITS[mode]} bits in groups of "
                         f"{modes.GROUP_SIZE[mode]}, not {bits} bits in groups of {group_size}")


def convert(
    model_dir: str | Path,
    out_dir: str | Path,
    plan: Plan,
    *,
    method: str = "fit",
    fit_options: fit.FitOptions = fit.DEFAULT,
    force: bool = False,
    progress: bool = True,
    manifest_path: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    workers: int | None = None,
    on_progress: ProgressCallback | None = None,
    moments: dict[str, np.ndarray] | None = None,
) -> ConvertResult:
    """Write the MLX checkpoint that `plan` describes for the HF model in model_dir.

    method: "fit" (searched scale/bias, fit.py) or "rtn" (exactly mx.quantize).
    workers: fitting threads (default: one per CPU core, at most 8).
    on_progress: called with ("convert", fraction done) as weights are written.
    moments: per-input-channel second moments by HF weight name (moments.py); with
    them the fit minimises the moment-weighted (output) error.
    """
    if method not in ("fit", "rtn"):
        raise ConvertError(f"method must be 'fit' or 'rtn', got {method!r}")
    out_dir = Path(out_dir).expanduser()
    _check_target(out_dir, force)
    ckpt = open_checkpoint(model_dir)
    model = build_model(ckpt.config)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt), model)
    check_plan(plan, name_map)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        workers = workers or min(8, os.cpu_count() or 1)
        writer = _Writer(ckpt, name_map, model, plan, method, fit_options, workers, on_progress)
        writer.moments = moments or {}
        errors = writer.write(staging, max_shard_bytes, progress)
        _write_config(staging / "config.json", ckpt.config, plan)
        _copy_side_files(ckpt.root, staging)
        plan.save(staging / PLAN_FILE)
        if manifest_path is not None:
            shutil.copyfile(manifest_path, staging / MANIFEST_FILE)
        verify_loads(staging)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ConvertResult(out_dir, plan, writer.bytes_written, errors)


def verify_loads(model_dir: Path) -> None:
    """Build the model through mlx_lm's loader, lazily: checks keys, shapes and the
    quantization config exactly as `mlx_lm.load` does, without reading the weights."""
    from mlx_lm.utils import load_model

    try:
        load_model(Path(model_dir), lazy=True, strict=True)
    except Exception as exc:  # mlx_lm raises ValueError/KeyError/...; report one line
        raise ConvertError(f"the written checkpoint does not load in mlx_lm: {exc}") from None


def source_dtype(ckpt: Checkpoint, tensor: MlxTensor) -> str:
    """The dtype name of the tensor in the source checkpoint."""
    return _CHECKPOINT_DTYPES[ckpt.info(tensor.sources[0]).dtype]


def float32_checkpoint(ckpt: Checkpoint) -> bool:
    """Whether the source is a float32 checkpoint: every matrix float32. Then scales,
    biases and float tensors are written in float16 (the 16 bits the plan counts). A
    GGUF's small or re-stacked tensors come back float32 inside an otherwise 16-bit
    model; those stay float32, as Qwen3.5's A_log does in a bf16 checkpoint."""
    found = _FLOAT32_SOURCE.get(ckpt)
    if found is None:
        matrices = [t for t in ckpt.tensors if len(t.shape) >= 2]
        found = bool(matrices) and all(t.dtype in ("F32", "F64") for t in matrices)
        _FLOAT32_SOURCE[ckpt] = found
    return found


_FLOAT32_SOURCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def storage_dtype(ckpt: Checkpoint, tensor: MlxTensor) -> str:
    """The dtype scales/biases (or float weights) are stored in: the source's, but
    float16 for a float32 checkpoint, so the bytes written are the 16 bits per scale,
    bias and float weight that the plan's bits per weight count."""
    dtype = source_dtype(ckpt, tensor)
    if dtype == "float32" and not float32_checkpoint(ckpt):
        return dtype
    return _STORED.get(dtype, "float16")


class _Writer:
    def __init__(self, ckpt, name_map, model, plan, method, fit_options, workers, on_progress):
        self.ckpt, self.name_map, self.plan = ckpt, name_map, plan
        self.method, self.fit_options = method, fit_options
        self.workers = workers
        self.on_progress: ProgressCallback | None = on_progress
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.floats = float_tensors(ckpt, name_map, model)  # lazy
        self.bytes_written = 0
        self.moments: dict[str, np.ndarray] = {}
        # A float32 checkpoint is written in float16 throughout, as its plan counts it;
        # float32 tensors of a 16-bit checkpoint (Qwen3.5's A_log) are kept as they are.
        self.f32_source = float32_checkpoint(ckpt)

    def outputs(self) -> list[tuple[MlxTensor, list[OutTensor]]]:
        out = []
        for t in self.name_map.tensors:
            if t.quantizable and self.plan.decisions[t.module].quantized:
                d = self.plan.decisions[t.module]
                dtype = DTYPE_OF_NAME[kept_scale_dtype(self.ckpt, t, d)
                                      or storage_dtype(self.ckpt, t)]
                lead, in_dim = t.shape[:-1], t.shape[-1]
                groups = (*lead, in_dim // d.group_size)
                outs = [OutTensor(f"{t.module}.weight", "U32", (*lead, in_dim * d.bits // 32))]
                if d.mode == "affine":
                    outs += [OutTensor(f"{t.module}.scales", dtype, groups),
                             OutTensor(f"{t.module}.biases", dtype, groups)]
                else:  # microscaling modes: one uint8 scale per group, no bias
                    outs.append(OutTensor(f"{t.module}.scales", "U8", groups))
                out.append((t, outs))
            elif t.quantizable:
                dtype = DTYPE_OF_NAME[storage_dtype(self.ckpt, t)]
                out.append((t, [OutTensor(t.key, dtype, t.shape)]))
            else:
                array = self.floats[t.key]
                if array.dtype not in _MX_DTYPES:
                    raise ConvertError(f"{t.key} has unsupported dtype {array.dtype}")
                dtype = _MX_DTYPES[array.dtype]
                out.append((t, [OutTensor(t.key, "F16" if self._narrowed(array) else dtype,
                                          t.shape)]))
        return out

    def _narrowed(self, array: mx.array) -> bool:
        return self.f32_source and array.dtype == mx.float32

    def write(self, folder: Path, max_shard_bytes: int, progress: bool) -> dict[str, float]:
        outputs = self.outputs()
        shards = plan_shards([o for _, outs in outputs for o in outs], max_shard_bytes)
        names = shard_names(len(shards))
        writers = {}
        for shard, name in zip(shards, names, strict=True):
            w = ShardWriter(folder / name, shard)
            writers.update({o.key: w for o in shard})
        self._writers = writers
        errors = {}
        total = sum(int(np.prod(t.shape)) for t, _ in outputs)
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="swan-fit")
        bar = phase_progress("convert", total, unit="w", enabled=progress,
                             on_update=self.on_progress)
        shard_writers = list({id(w): w for w in writers.values()}.values())
        try:
            with self._pool or contextlib.nullcontext(), bar:
                for t, outs in outputs:
                    if t.quantizable and self.plan.decisions[t.module].quantized:
                        errors[t.module] = self._quantized(t, bar)
                    elif t.quantizable:
                        self._float_weight(t, outs[0], bar)
                    else:
                        self._float(t, outs[0], bar)
        except BaseException:
            for w in shard_writers:
                w.close(check=False)
            raise
        for w in shard_writers:
            w.close()
        self.bytes_written = sum(o.nbytes for shard in shards for o in shard)
        weight_map = {o.key: name for shard, name in zip(shards, names, strict=True) for o in shard}
        write_index(folder / INDEX_NAME, weight_map, self.bytes_written)
        return errors

    def _write(self, key: str, data: np.ndarray, first_element: int = 0) -> None:
        self._writers[key].write(key, data, first_element)

    def _quantized(self, t: MlxTensor, bar) -> float:
        """Fit and write one module block by block; returns its relative RMS error."""
        rows, in_dim = t.shape[-2], t.shape[-1]
        step = max(1, _BLOCK_ELEMENTS // in_dim)
        blocks = [(slot, r0, min(rows, r0 + step))
                  for slot in range(len(t.slots)) for r0 in range(0, rows, step)]
        err_sq = ref_sq = 0.0
        # Blocks are fitted in worker threads (numpy releases the GIL in its loops),
        # a bounded window at a time so memory stays a few blocks per worker.
        window = max(1, 2 * self.workers)
        for i in range(0, len(blocks), window):
            batch = blocks[i : i + window]
            results = (self._pool.map(lambda b: self._fit_block(t, *b), batch) if self._pool
                       else map(lambda b: self._fit_block(t, *b), batch))
            for block_err, block_ref, size in results:
                err_sq += block_err
                ref_sq += block_ref
                bar.update(size)
        return (err_sq / ref_sq) ** 0.5 if ref_sq else 0.0

    def _float_mode_block(self, t: MlxTensor, slot: int, r0: int, r1: int):
        """mxfp4/mxfp8/nvfp4 rows exactly as mx.quantize would write them."""
        d = self.plan.decisions[t.module]
        w = read_slot_rows(self.ckpt, t.slots[slot], r0, r1)
        packed, scales = modes.quantize(w, d.mode, source_dtype(self.ckpt, t))
        diff = modes.dequantize(packed, scales, d.mode) - w
        first_row = slot * t.shape[-2] + r0
        with self._lock:
            self._write(f"{t.module}.weight", packed, first_row * packed.shape[-1])
            self._write(f"{t.module}.scales", scales, first_row * scales.shape[-1])
        return float(np.vdot(diff, diff)), float(np.vdot(w, w)), w.size

    def _fit_block(self, t: MlxTensor, slot: int, r0: int, r1: int) -> tuple[float, float, int]:
        d = self.plan.decisions[t.module]
        if d.mode != "affine":
            return self._float_mode_block(t, slot, r0, r1)
        scale_dtype = storage_dtype(self.ckpt, t)
        store = DTYPE_OF_NAME[scale_dtype]
        w = read_slot_rows(self.ckpt, t.slots[slot], r0, r1)
        kept = exact_groups(self.ckpt, t, slot, r0, r1, d)  # --recipe keep on GGUF
        if kept is not None:
            codes, scales, biases, scale_dtype = kept
            store = DTYPE_OF_NAME[scale_dtype]
        elif self.method == "fit":
            importance = importance_of(self.moments, t, slot)
            codes, scales, biases = fit.fit(w, d.bits, d.group_size, scale_dtype, self.fit_options,
                                            importance=importance)
        else:
            codes, scales, biases = affine.quantize(w, d.bits, d.group_size, scale_dtype)
        first_row = slot * t.shape[-2] + r0
        words, groups = t.shape[-1] * d.bits // 32, t.shape[-1] // d.group_size
        packed = affine.pack(codes, d.bits)
        diff = affine.dequantize(codes, scales, biases, d.group_size) - w
        with self._lock:  # one file position per shard
            self._write(f"{t.module}.weight", packed, first_row * words)
            self._write(f"{t.module}.scales", to_storage(scales, store), first_row * groups)
            self._write(f"{t.module}.biases", to_storage(biases, store), first_row * groups)
        return float(np.vdot(diff, diff)), float(np.vdot(w, w)), w.size

    def _float_weight(self, t: MlxTensor, out: OutTensor, bar) -> None:
        rows, in_dim = t.shape[-2], t.shape[-1]
        step = max(1, _BLOCK_ELEMENTS // in_dim)
        for slot_index, slot in enumerate(t.slots):
            for r0 in range(0, rows, step):
                w = read_slot_rows(self.ckpt, slot, r0, min(rows, r0 + step))
                self._write(out.key, to_storage(w, out.dtype), (slot_index * rows + r0) * in_dim)
                bar.update(w.size)

    def _float(self, t: MlxTensor, out: OutTensor, bar) -> None:
        array = self.floats.pop(t.key)  # read now, freed after writing
        if self._narrowed(array):
            array = array.astype(mx.float16)
            if not bool(mx.all(mx.isfinite(array))):
                raise ConvertError(f"{t.key} overflows float16, which float32 sources are "
                                   "written in")
        if array.dtype == mx.bfloat16:
            raw = np.array(array.view(mx.uint16))
        else:
            raw = np.array(array)
        self._write(out.key, raw.astype(raw.dtype.newbyteorder("<"), copy=False))
        bar.update(raw.size)


def quantization_config(plan: Plan) -> dict:
    """mlx_lm's config["quantization"]: a default plus one entry per quantizable module
    (its settings, or false when it stays in float). The default is the most common
    setting; every module is named, so the loader never falls back to it."""
    settings = Counter(
        (d.bits, d.group_size, d.mode) for d in plan.decisions.values() if d.quantized
    )
    bits, group_size, mode = settings.most_common(1)[0][0] if settings else (4, 64, "affine")
    quant: dict = {"group_size": group_size, "bits": bits, "mode": mode}
    for module, d in sorted(plan.decisions.items()):
        quant[module] = (
            {"group_size": d.group_size, "bits": d.bits, "mode": d.mode} if d.quantized
            else False
        )
    return quant


def _write_config(path: Path, source_config: dict, plan: Plan) -> None:
    config = {k: v for k, v in source_config.items() if k != "_name_or_path"}
    config["quantization"] = quantization_config(plan)
    config["quantization_config"] = config["quantization"]  # the HF-tree name mlx_lm also reads
    path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")


def _copy_side_files(src: Path, dst: Path) -> None:
    for path in sorted(Path(src).iterdir()):
        if not path.is_file() or path.name in _NOT_COPIED_NAMES:
            continue
        if path.name.endswith(_NOT_COPIED_SUFFIXES) or path.name.startswith("."):
            continue
        shutil.copyfile(path, dst / path.name)


def _check_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvertError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConvertError(f"{out_dir} is not empty; pass --force to replace it")


def _publish(staging: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an old one (--force) goes only after."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

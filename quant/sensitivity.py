"""The output-aware objective: predicted KL of every (module, bits, group) choice.

For a linear module y = W x with per-channel input second moments d_j = E[x_j^2]
(moments.py, or an imatrix file), the expected output error of a quantized
W_hat is, for uncorrelated channels,

    E||(W - W_hat) x||^2  =  sum_ij (W - W_hat)_ij^2 d_j

measured here per candidate (bits, group) with the importance-weighted group fit
that the converter will use (fit.py), on whole rows of the weight (all of them
for small matrices, an evenly strided sample for big ones, scaled up).

How much output KL one unit of that error costs depends on where the module
sits (a down projection writes straight into the residual stream, a key
projection passes through a softmax). `calibrate` measures it per tensor class
on the model's own text (numpy forward passes, npmodel.py): every module of one
class at a time is quantized to a probe setting (plain rounding), the mean
KL(float || quantized) of the next-token distributions is measured, and the
class gain is KL / (summed predicted error). Class gains are measured on the
layers between the first two and the last one; every module of those edge layers
is measured alone and gets its own gain, because the residual stream there has
another scale (in the demo model the first layer's residual is ~1e4x smaller than
the rest, and its o_proj cost 345x the KL its class gain predicted). The probe
goes in as a read-time override (npweights.py), so a streamed model never holds
more than one layer. The knapsack then minimises
sum_m gain[m] * error_m(setting)  at the bit budget.
Cost: (classes + 1 + modules of 3 layers) forward passes over the self-generated
text, and one more read of the calibrated weights (row blocks) for their
predicted errors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from . import fit, modes
from . import settings as setting_mod
from .affine import dequantize, quantize_dequantize
from .manifest import sig
from .mlx_names import MlxTensor, NameMap, read_slot_rows
from .npmodel import NpModel
from .sources.checkpoint import Checkpoint

Setting = setting_mod.Setting  # (bits, group) affine, or (bits, group, mode)
PROBE: Setting = (3, 64)  # the setting classes are calibrated at
# Layers whose modules get their own gain: where the residual stream's scale departs
# from the rest (the first layers of real models write into a residual ~1e4x smaller
# than later ones, so one class gain underrates their errors by 100x and more).
EDGE_FIRST, EDGE_LAST = 2, 1
_KL_FLOOR = 1e-6  # below this a probe's KL is float32 noise
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_SAMPLE_ELEMENTS = 1 << 18  # weights per matrix the candidate errors are measured on
_BLOCK_ELEMENTS = 1 << 22
_EXPERT_SAMPLE = 4
SENSITIVITY_FILE = "swan-sensitivity.json"


@dataclass
class Sensitivity:
    # module -> setting -> predicted E||(W - W_hat) x||^2 summed over the module's outputs
    errors: dict[str, dict[Setting, float]] = field(default_factory=dict)
    # tensor class -> KL (nats per token) per unit of predicted error
    class_gain: dict[str, float] = field(default_factory=dict)
    moments_source: str = ""
    # module -> its own gain (edge layers, see calibrate); beats the class gain
    module_gain: dict[str, float] = field(default_factory=dict)

    def loss(self, module: str, tensor_class: str, setting: Setting) -> float:
        gain = self.module_gain.get(module)
        if gain is None:
            gain = self.class_gain.get(tensor_class, self.default_gain())
        return gain * self.errors[module][setting]

    def default_gain(self) -> float:
        gains = sorted(self.class_gain.values())
        return gains[len(gains) // 2] if gains else 1.0

    def save(self, path: str | Path) -> None:
        data = {
            "moments_source": self.moments_source,
            "class_gain": dict(sorted(self.class_gain.items())),
            "module_gain": dict(sorted(self.module_gain.items())),
            "errors": {m: {setting_mod.label(s): e for s, e in sorted(errs.items(), key=str)}
                       for m, errs in sorted(self.errors.items())},
        }
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        data = json.loads(Path(path).read_text())
        errors = {m: {setting_mod.parse(k): e for k, e in errs.items()}
                  for m, errs in data["errors"].items()}
        return cls(errors=errors, class_gain=data["class_gain"],
                   moments_source=data.get("moments_source", ""),
                   module_gain=data.get("module_gain", {}))


def importance_of(moments: dict[str, np.ndarray], tensor: MlxTensor, slot: int
                  ) -> np.ndarray | None:
    """The input moments of one slot (expert) of an MLX weight, if known: keyed by the
    HF tensor the slot's rows come from ([in], or [n_experts, in] for an HF tensor
    that stacks experts)."""
    if tensor.slots:
        piece = tensor.slots[slot][0]
        name, expert = piece.hf_name, piece.expert
    elif len(tensor.sources) == 1:
        name, expert = tensor.sources[0], None
    else:
        return None
    m = moments.get(name)
    if m is None:
        return None
    m = np.asarray(m, dtype=np.float32)
    if m.ndim == 2:
        return m[slot if expert is None else expert]
    return m


def _sample_rows(ckpt: Checkpoint, slot, rows: int, in_dim: int) -> tuple[np.ndarray, float]:
    """(rows of the slot's matrix, how many matrix rows each sampled row stands for)."""
    want = max(1, _SAMPLE_ELEMENTS // in_dim)
    if want >= rows:
        return read_slot_rows(ckpt, slot, 0, rows), 1.0
    stride = rows // want
    parts = []
    step = max(stride, (_BLOCK_ELEMENTS // in_dim) // stride * stride)
    for r0 in range(0, rows, step):  # stream; keep every stride-th row
        # a copy: a strided view would keep each whole block alive (a 152k-row
        # embedding's sample then held all of it in float32, 2.5 GB for Qwen3-8B)
        parts.append(read_slot_rows(ckpt, slot, r0, min(rows, r0 + step))[::stride].copy())
    sample = np.concatenate(parts)
    return sample, rows / sample.shape[0]


def _candidate_diff(w: np.ndarray, s: Setting, scale_dtype: str, source_dtype: str,
                    options: fit.FitOptions, imp: np.ndarray | None) -> np.ndarray:
    """W_hat - W for one candidate, as the converter would write it."""
    mode = setting_mod.mode_of(s)
    if mode != "affine":  # exactly mx.quantize's codes, computed in the source's dtype
        return modes.error(w, mode, source_dtype)
    codes, scales, biases = fit.fit(w, s[0], s[1], scale_dtype, options, importance=imp)
    return dequantize(codes, scales, biases, s[1]) - w


def module_errors(ckpt: Checkpoint, tensor: MlxTensor, moments: dict[str, np.ndarray],
                  settings: list[Setting], scale_dtype: str,
                  options: fit.FitOptions = fit.FAST,
                  source_dtype: str = "float32") -> dict[Setting, float]:
    """Predicted output error of each setting for one quantizable module."""
    rows, in_dim = tensor.shape[-2], tensor.shape[-1]
    slots = range(len(tensor.slots))
    if len(tensor.slots) > _EXPERT_SAMPLE:
        slots = np.linspace(0, len(tensor.slots) - 1, _EXPERT_SAMPLE).round().astype(int)
    totals = {s: 0.0 for s in settings}
    for slot in slots:
        w, weight = _sample_rows(ckpt, tensor.slots[slot], rows, in_dim)
        imp = importance_of(moments, tensor, int(slot))
        d = np.ones(in_dim, np.float32) if imp is None else imp
        for s in settings:
            diff = _candidate_diff(w, s, scale_dtype, source_dtype, options, imp)
            totals[s] += weight * float(np.einsum("ij,ij,j->", diff, diff, d))
    scale = len(tensor.slots) / len(slots)
    return {s: sig(v * scale) for s, v in totals.items()}


def candidate_errors(ckpt: Checkpoint, name_map: NameMap, moments: dict[str, np.ndarray],
                     settings_of: dict[str, list[Setting]], progress: bool = False,
                     ) -> dict[str, dict[Setting, float]]:
    """module -> setting -> predicted output error, for every module in settings_of."""
    from tqdm import tqdm

    from .convert import source_dtype, storage_dtype

    tensors = name_map.by_module()
    out = {}
    for module in tqdm(sorted(settings_of), desc="output errors", disable=not progress):
        t = tensors[module]
        out[module] = module_errors(ckpt, t, moments, settings_of[module], storage_dtype(ckpt, t),
                                    source_dtype=source_dtype(ckpt, t))
    return out


def relative_mode_errors(ckpt: Checkpoint, name_map: NameMap, mode_names: list[str],
                         ) -> dict[str, dict[Setting, float]]:
    """module -> microscaling setting -> relative weight MSE ||W_hat - W||^2 / ||W||^2
    (on the same row sample as module_errors): what the weight objective compares
    with the analyzer's affine candidates."""
    from .convert import source_dtype

    out = {}
    for t in name_map.quantizable():
        candidates = setting_mod.float_mode_settings(mode_names, t.shape[-1])
        if not candidates:
            continue
        err = {s: 0.0 for s in candidates}
        ref = 0.0
        slots = np.linspace(0, len(t.slots) - 1, min(len(t.slots), _EXPERT_SAMPLE))
        for slot in slots.round().astype(int):
            w, _ = _sample_rows(ckpt, t.slots[slot], t.shape[-2], t.shape[-1])
            ref += float(np.vdot(w, w))
            for s in candidates:
                diff = modes.error(w, setting_mod.mode_of(s), source_dtype(ckpt, t))
                err[s] += float(np.vdot(diff, diff))
        out[t.module] = {s: sig(e / ref) if ref else 0.0 for s, e in err.items()}
    return out


def calibrate(model: NpModel, sequences: list[list[int]], name_map: NameMap,
              moments: dict[str, np.ndarray], class_of: dict[str, str],
              probe: Setting = PROBE, max_tokens: int = 256,
              ) -> tuple[dict[str, float], dict[str, float]]:
    """(per tensor class, per edge-layer module): KL per unit of predicted output
    error (see the module doc). Class gains come from the layers between the edges
    (all layers when there are none between)."""
    batch = _calibration_batch(sequences, max_tokens)
    reference = _log_probs(model.forward(batch))
    quantize = partial(_probe, bits=probe[0], group=probe[1])

    def gain(tensors: list[MlxTensor]) -> float | None:
        """KL per unit of predicted error with `tensors` quantized together."""
        predicted = sum(_predicted_error(model, t, moments, quantize) for t in tensors)
        model.overrides.update({t.key: quantize for t in tensors})
        try:
            quant = _log_probs(model.forward(batch))
        finally:
            for t in tensors:
                model.overrides.pop(t.key, None)
        kl = float(np.mean(np.sum(np.exp(reference) * (reference - quant), axis=-1)))
        if predicted <= 0 or kl < _KL_FLOOR:  # nothing measurable above float noise
            return None
        return sig(kl / predicted, 3)

    edges = _edge_layers(model.shape.layers)
    by_class: dict[str, list[MlxTensor]] = {}
    edge_modules: list[MlxTensor] = []
    for t in name_map.quantizable():
        if (t.module in class_of and t.shape[-1] % probe[1] == 0 and len(t.slots) == 1
                and t.key in model.weights):
            by_class.setdefault(class_of[t.module], []).append(t)
            if _layer_of(t.module) in edges:
                edge_modules.append(t)
    class_gains = {}
    for cls, tensors in sorted(by_class.items()):
        inner = [t for t in tensors if _layer_of(t.module) not in edges] or tensors
        g = gain(inner)
        if g is not None:
            class_gains[cls] = g
    module_gains = {}
    for t in edge_modules:
        g = gain([t])
        if g is not None:
            module_gains[t.module] = g
    return class_gains, module_gains


def _edge_layers(layers: int) -> set[int]:
    """The first EDGE_FIRST and last EDGE_LAST decoder layers."""
    return set(range(min(EDGE_FIRST, layers))) | set(range(max(0, layers - EDGE_LAST), layers))


def _layer_of(module: str) -> int | None:
    m = _LAYER.search(module)
    return int(m.group(1)) if m else None


def _probe(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Plain round-to-nearest quantize-dequantize (row by row: groups run along rows)."""
    return quantize_dequantize(w, bits, group)


def _predicted_error(model: NpModel, t: MlxTensor, moments: dict[str, np.ndarray],
                     quantize) -> float:
    """sum_ij (W - W_hat)_ij^2 d_j of one weight, read a row block at a time."""
    imp = importance_of(moments, t, 0)
    total = 0.0
    for _, w in model.weights.row_blocks(t.key):
        diff = quantize(w) - w
        d = np.ones(diff.shape[-1], np.float32) if imp is None else imp
        total += float(np.einsum("ij,ij,j->", diff, diff, d))
    return total


def _calibration_batch(sequences: list[list[int]], max_tokens: int) -> np.ndarray:
    """Equal-length windows cut from the self-generated conversations."""
    length = min(128, min(len(s) for s in sequences))
    rows = [s[:length] for s in sequences][: max(1, max_tokens // length)]
    return np.array(rows, dtype=np.int64)


def _log_probs(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

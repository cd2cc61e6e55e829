"""Per-input-channel pre-scales for each fold group: AWQ from moments, or data-free.

For a fold group (fold_groups.py) every consumer weight W gets W * s (columns)
and the producer absorbs 1/s, so the model is unchanged before quantization;
after it, the error each consumer adds is (Q(W s) - W s) / s applied to x, whose
expected size is

    err(s) = sum_j d_j / s_j^2 * sum_i (Q(W s) - W s)_ij^2,    d_j = E[x_j^2],

Q being the group fit that convert runs (fit.py, importance d / s^2, its fast
setting here).

Both methods pick s = base^alpha (geometric mean 1) with alpha from a small grid
that includes 0 (s = 1), by the smallest err(s) at the setting the weights will
get (4-bit, group 64 unless told), so on this measure a fold is never worse than
none:

* "awq": base = the group's input moments d (averaged over its consumers, each
  normalised), as in AWQ: channels that see large inputs are quantized finer.
* "equalize": base = 1 / c from a Sinkhorn-style balancing of the consumers'
  stacked weights (divide rows, then columns, by their standard deviations, a few
  rounds, as in the SINQ paper's idea): no data, err(s) with d = 1.

Cost is bounded: at most SAMPLE_ROWS rows of each consumer slot and SAMPLE_SLOTS
experts of a stacked consumer are read for the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import affine, fit
from .fold_groups import FoldGroup
from .mlx_names import MlxTensor, read_slot_rows
from .sources.checkpoint import Checkpoint

Method = Literal["awq", "equalize"]
ALPHAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
SAMPLE_ROWS = 256
SAMPLE_SLOTS = 8
SINKHORN_ROUNDS = 8
_FLOOR = 1e-8  # moments of dead channels: keeps logs and ratios finite


@dataclass(frozen=True)
class SearchSetting:
    bits: int = 4
    group_size: int = 64


DEFAULT_SETTING = SearchSetting()


@dataclass(frozen=True)
class GroupScale:
    scale: np.ndarray  # s, float32 [group.size], geometric mean 1
    alpha: float
    error: float  # err(s) on the sampled rows
    error_unscaled: float  # err(1)


def setting_for(target_bpw: float | None) -> SearchSetting:
    """The setting most weights will get at a bits-per-weight target (4-bit g64 unknown)."""
    if target_bpw is None:
        return SearchSetting()
    bits = min(affine.SUPPORTED_BITS, key=lambda b: abs(b + 0.5 - target_bpw))
    return SearchSetting(bits=bits)


def slot_moments(moments: dict[str, np.ndarray], tensor: MlxTensor, slot: int
                 ) -> np.ndarray | None:
    """E[x^2] of one slot (expert) of an MLX weight, from moments by HF weight name."""
    piece = tensor.slots[slot][0]
    m = moments.get(piece.hf_name)
    if m is None:
        return None
    m = np.asarray(m, dtype=np.float64)
    if m.ndim == 2:
        return m[piece.expert if piece.expert is not None else slot]
    return m


def group_scales(ckpt: Checkpoint, groups: list[FoldGroup], method: Method,
                 moments: dict[str, np.ndarray] | None = None,
                 setting: SearchSetting = DEFAULT_SETTING) -> dict[str, GroupScale]:
    """The chosen scale of every group (alpha 0 groups included, s = 1)."""
    if method == "awq" and not moments:
        raise ValueError("AWQ pre-scaling needs input moments (an imatrix)")
    return {g.name: _search(ckpt, g, method, moments or {}, setting) for g in groups}


def _search(ckpt: Checkpoint, group: FoldGroup, method: Method,
            moments: dict[str, np.ndarray], setting: SearchSetting) -> GroupScale:
    samples = [(_sample(ckpt, t, slot), _importance(moments, t, slot, method))
               for t, slot in _sampled_consumers(group)]
    cols = group.expand if group.expand is not None else np.arange(group.size)
    if method == "awq":
        base = _awq_base([d for _, d in samples], cols, group.size)
    else:
        base = _sinkhorn_base([w for w, _ in samples], cols, group.size)
    group_size = next((g for g in (setting.group_size, 64, 32)
                       if all(w.shape[-1] % g == 0 for w, _ in samples)), None)
    best = None
    log_base = np.log(base)
    for alpha in ALPHAS if group_size else (0.0,):
        t = np.exp(alpha * (log_base - log_base.mean()))
        err = sum(_error(w, d, t[cols], setting.bits, group_size) for w, d in samples
                  ) if group_size else 0.0
        if alpha == 0.0:
            unscaled = err
        if best is None or err < best[1]:
            best = (alpha, err, t)
    alpha, err, t = best
    return GroupScale(t.astype(np.float32), alpha, float(err), float(unscaled))


def _sampled_consumers(group: FoldGroup) -> list[tuple[MlxTensor, int]]:
    """All consumer slots, but at most SAMPLE_SLOTS evenly spaced experts per module."""
    out, by_module = [], {}
    for t, slot in group.consumers:
        by_module.setdefault(t.module, (t, []))[1].append(slot)
    for t, slots in by_module.values():
        keep = np.unique(np.linspace(0, len(slots) - 1, min(len(slots), SAMPLE_SLOTS)).astype(int))
        out.extend((t, slots[k]) for k in keep)
    return out


def _sample(ckpt: Checkpoint, tensor: MlxTensor, slot: int) -> np.ndarray:
    rows = tensor.shape[-2]
    if rows <= SAMPLE_ROWS:
        return read_slot_rows(ckpt, tensor.slots[slot], 0, rows)
    picks = np.linspace(0, rows - 1, SAMPLE_ROWS).astype(int)
    return np.concatenate([read_slot_rows(ckpt, tensor.slots[slot], r, r + 1) for r in picks])


def _importance(moments: dict[str, np.ndarray], tensor: MlxTensor, slot: int,
                method: Method) -> np.ndarray:
    d = slot_moments(moments, tensor, slot) if method == "awq" else None
    if d is None:
        return np.ones(tensor.shape[-1])
    return np.maximum(d, _FLOOR * max(float(d.mean()), _FLOOR))


def _awq_base(importances: list[np.ndarray], cols: np.ndarray, size: int) -> np.ndarray:
    """Mean normalised moments per scale index (o_proj columns averaged per v row)."""
    mean = np.mean([d / d.mean() for d in importances], axis=0)
    return np.bincount(cols, mean, size) / np.bincount(cols, minlength=size)


def _sinkhorn_base(weights: list[np.ndarray], cols: np.ndarray, size: int) -> np.ndarray:
    """1 / column factor of a row/column std balancing of the stacked weights."""
    w = np.concatenate(weights).astype(np.float64)
    row = np.ones(w.shape[0])
    col = np.ones(w.shape[1])
    for _ in range(SINKHORN_ROUNDS):
        row *= np.maximum((w / row[:, None] / col).std(axis=1), _FLOOR)
        row /= np.exp(np.log(row).mean())
        col *= np.maximum((w / row[:, None] / col).std(axis=0), _FLOOR)
        col /= np.exp(np.log(col).mean())
    log_col = np.bincount(cols, np.log(col), size) / np.bincount(cols, minlength=size)
    return np.exp(-log_col)


def _error(w: np.ndarray, d: np.ndarray, s: np.ndarray, bits: int, group_size: int) -> float:
    """sum_j d_j / s_j^2 * sum_i (Q(W s) - W s)_ij^2, Q the importance-weighted group fit
    that convert runs (fit.py) with the moments the scaled module sees: searching with
    plain rounding instead picks scales whose gain that fit has already taken."""
    scaled = w * s.astype(np.float32)
    seen = (d / np.square(s)).astype(np.float32)
    codes, scales, biases = fit.fit(scaled, bits, group_size, "float32", fit.FAST,
                                    importance=seen)
    diff = affine.dequantize(codes, scales, biases, group_size) - scaled
    per_col = np.einsum("ij,ij->j", diff, diff, dtype=np.float64)
    return float(per_col @ seen)

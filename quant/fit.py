"""Per-group scale and bias fitting that beats MLX's min/max rounding, data-free.

`mx.quantize` takes each group's min and max as the ends of its grid. One outlier
then stretches the grid for the whole group, and rounding the scale and bias to
the checkpoint's dtype (bf16) afterwards adds an error that the codes never see.
Here, per group of `group_size` weights, we pick the grid with the smallest
squared error after storage rounding:

1. candidates: MLX's own grid (so a group is never worse than `mx.quantize`) and
   the plain min/max grid;
2. clipping search: coordinate descent over how far the low and the high end of
   the grid move inwards (a fraction of the range; a few passes, low, high, low);
3. least-squares refit: given the codes, the best scale and bias are a linear
   regression of the weights on the codes; refit, re-round, keep if better;
4. every candidate is judged with scale and bias rounded to the storage dtype
   and the codes recomputed from the rounded values (the codes that are stored).

With `importance` (one non-negative weight per input channel: the second moment
E[x_j^2] of the input the weight multiplies, from moments.py or an imatrix file)
every squared error above is weighted by it, so the fit minimises the module's
expected output error E||(W - W_hat) x||^2 (for uncorrelated channels) instead of
the weight error, as llama.cpp's imatrix quantizers do.

Output has the format of `affine.quantize`: uint8 codes shaped like w, float32
scales and biases (already representable in `scale_dtype`), so `affine.pack`
and `affine.dequantize` (and MLX's `mx.dequantize`) read it unchanged.
Pure numpy, processed in row blocks so a 150k x 4096 embedding fits in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import affine

_TINY = np.float32(1e-7)  # MLX's lower bound on a scale
_BLOCK_ELEMENTS = 1 << 21  # weights fitted at once (~8 MB of float32 per temporary)


@dataclass(frozen=True)
class FitOptions:
    """Search effort. The defaults reach ~0.82x of mx.quantize's MSE at 4-bit g64 on
    trained weights at ~6x the cost of plain rounding; `FAST` is ~3x cheaper."""

    clip_steps: int = 6  # clipping fractions tried per pass (excluding no clipping)
    max_clip: float = 0.2  # largest fraction of the group's range cut off one end
    passes: int = 3  # coordinate passes: low end, high end, low end again
    refits: int = 2  # least-squares refits of scale and bias given the codes


DEFAULT = FitOptions()
FAST = FitOptions(clip_steps=3, passes=2, refits=1)


def fit(
    w: np.ndarray,
    bits: int,
    group_size: int,
    scale_dtype: str = "float32",
    options: FitOptions = DEFAULT,
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fitted (codes uint8 shaped like w, scales, biases (..., in // group_size)).

    importance: per-input-channel weights [in_dim] of the squared error (None: all 1).
    """
    in_dim = np.shape(w)[-1]
    affine.check_setting(bits, group_size, in_dim)
    affine.round_to_dtype(np.zeros(1, np.float32), scale_dtype)  # validates the dtype name
    weights = _group_weights(importance, in_dim, group_size)
    w = np.asarray(w)
    groups = w.reshape(-1, group_size)
    codes = np.empty(groups.shape, dtype=np.uint8)
    scales = np.empty(groups.shape[0], dtype=np.float32)
    biases = np.empty(groups.shape[0], dtype=np.float32)
    step = max(1, _BLOCK_ELEMENTS // group_size)
    for start in range(0, groups.shape[0], step):
        block = np.ascontiguousarray(groups[start : start + step], dtype=np.float32)
        block_weights = None
        if weights is not None:  # group k of the flat list is group k % per_row of its row
            block_weights = weights[np.arange(start, start + len(block)) % len(weights)]
        q, s, b = _fit_groups(block, bits, scale_dtype, options, block_weights)
        codes[start : start + step] = q
        scales[start : start + step] = s
        biases[start : start + step] = b
    lead = w.shape[:-1]
    n_groups = w.shape[-1] // group_size
    return (
        codes.reshape(w.shape),
        scales.reshape(*lead, n_groups),
        biases.reshape(*lead, n_groups),
    )


def _group_weights(importance: np.ndarray | None, in_dim: int, group_size: int,
                   ) -> np.ndarray | None:
    """[in_dim // group_size, group_size] float32 weights, each group's mean 1 (a
    group's weights only rank its own errors), or None."""
    if importance is None:
        return None
    imp = np.asarray(importance, dtype=np.float64).reshape(-1)
    if imp.shape[0] != in_dim:
        raise ValueError(f"importance has {imp.shape[0]} channels, the weight {in_dim}")
    if not np.all(np.isfinite(imp)) or np.any(imp < 0):
        raise ValueError("importance must be finite and non-negative")
    g = imp.reshape(-1, group_size)
    mean = g.mean(axis=1, keepdims=True)
    # A group whose channels are all (near) zero: fall back to plain squared error.
    g = np.where(mean > 0, g / np.where(mean > 0, mean, 1.0), 1.0)
    return (g + 1e-6).astype(np.float32)  # no channel entirely free


def relative_mse(w: np.ndarray, codes: np.ndarray, scales: np.ndarray, biases: np.ndarray,
                 group_size: int) -> float:
    """||dequantize - w||^2 / ||w||^2 (0 for an all-zero w)."""
    w = np.asarray(w, dtype=np.float32)
    err = affine.dequantize(codes, scales, biases, group_size) - w
    denom = float(np.vdot(w.astype(np.float64), w.astype(np.float64)))
    if denom == 0.0:
        return 0.0
    return float(np.vdot(err.astype(np.float64), err.astype(np.float64))) / denom


class _Best:
    """Per-group best (error, scale, bias) so far, with storage-rounded scale/bias."""

    def __init__(self, x: np.ndarray, n_bins: np.float32, scale_dtype: str,
                 weights: np.ndarray | None):
        self.x, self.n_bins, self.dtype, self.weights = x, n_bins, scale_dtype, weights
        self.err = np.full(x.shape[0], np.inf, dtype=np.float32)
        self.scale = np.zeros(x.shape[0], dtype=np.float32)
        self.bias = np.zeros(x.shape[0], dtype=np.float32)

    def offer(self, scale: np.ndarray, bias: np.ndarray) -> None:
        scale = affine.round_to_dtype(scale, self.dtype)
        bias = affine.round_to_dtype(bias, self.dtype)
        err = _sse(self.x, scale, bias, self.n_bins, self.weights)
        better = err < self.err
        self.err = np.where(better, err, self.err)
        self.scale = np.where(better, scale, self.scale)
        self.bias = np.where(better, bias, self.bias)


def _codes(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, n_bins: np.float32) -> np.ndarray:
    q = x - bias[:, None]
    q /= scale[:, None]
    np.rint(q, out=q)
    np.clip(q, np.float32(0), n_bins, out=q)
    return q


def _sse(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, n_bins: np.float32,
         weights: np.ndarray | None = None) -> np.ndarray:
    """Per-group (weighted) sum of squared errors of the codes that (scale, bias) give."""
    q = _codes(x, scale, bias, n_bins)
    q *= scale[:, None]
    q += bias[:, None]
    q -= x
    q *= q
    if weights is not None:
        q *= weights
    return q.sum(axis=1)


def _grid(lo: np.ndarray, hi: np.ndarray, n_bins: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Scale and bias of the grid spanning [lo, hi] with positive scale."""
    return np.maximum((hi - lo) / n_bins, _TINY), lo


def _least_squares(x: np.ndarray, q: np.ndarray, scale: np.ndarray,
                   weights: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Best (scale, bias) for fixed codes q: (weighted) regression of x on q, per group."""
    if weights is None:
        q_mean, x_mean = q.mean(axis=1), x.mean(axis=1)
        qc = q - q_mean[:, None]
        var = np.einsum("ij,ij->i", qc, qc)
        cov = np.einsum("ij,ij->i", qc, x)
    else:
        total = weights.sum(axis=1)
        q_mean = np.einsum("ij,ij->i", weights, q) / total
        x_mean = np.einsum("ij,ij->i", weights, x) / total
        qc = q - q_mean[:, None]
        var = np.einsum("ij,ij,ij->i", weights, qc, qc)
        cov = np.einsum("ij,ij,ij->i", weights, qc, x)
    usable = var > 0
    new_scale = np.where(usable, cov / np.where(usable, var, 1), scale)
    # Keep the grid's orientation (MLX's grid may count down from the max) and a
    # scale that survives rounding to float16.
    new_scale = np.where(new_scale * scale > 0, new_scale, scale)
    new_scale = np.copysign(np.maximum(np.abs(new_scale), _TINY), new_scale)
    return new_scale, x_mean - new_scale * q_mean


def _fit_groups(
    x: np.ndarray, bits: int, scale_dtype: str, options: FitOptions,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_bins = np.float32((1 << bits) - 1)
    best = _Best(x, n_bins, scale_dtype, weights)
    best.offer(*affine._scale_bias(x, bits))  # MLX's own grid: never worse than mx.quantize
    lo, hi = x.min(axis=1), x.max(axis=1)
    span = hi - lo
    best.offer(*_grid(lo, hi, n_bins))
    best_lo, best_hi = lo, hi
    fractions = np.linspace(0.0, options.max_clip, options.clip_steps + 1, dtype=np.float32)[1:]
    for p in range(options.passes):
        move_low = p % 2 == 0
        for f in fractions:
            cand_lo = lo + f * span if move_low else best_lo
            cand_hi = best_hi if move_low else hi - f * span
            before = best.err
            best.offer(*_grid(cand_lo, cand_hi, n_bins))
            took = best.err < before
            best_lo = np.where(took, cand_lo, best_lo)
            best_hi = np.where(took, cand_hi, best_hi)
    for _ in range(options.refits):
        q = _codes(x, best.scale, best.bias, n_bins)
        best.offer(*_least_squares(x, q, best.scale, weights))
    codes = _codes(x, best.scale, best.bias, n_bins).astype(np.uint8)
    return codes, best.scale, best.bias

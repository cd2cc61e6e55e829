"""The four SWAN metrics as pure functions on numpy arrays (float32 maths, float64 sums).

1. Spectral concentration: the share of the Frobenius energy held by the top
   `fraction` (10%) of singular values, sum_{i<=k} s_i^2 / sum_i s_i^2 with
   k = ceil(fraction * min(m, n)). It is at least `fraction` (a flat spectrum)
   and at most 1. `spectral_concentration` is exact (eigenvalues of the smaller
   Gram matrix); the denominator is always the total energy of the matrix the
   eigenvalues come from (its full trace), never the sum of a truncated set.
   For large tensors analyze.py applies it to a seeded, stratified sub-block
   (`stratified_indices`) that keeps the tensor's aspect ratio: every high-energy
   row/column is taken (down-weighted by sqrt(p) to its sampling weight) and the
   rest is sampled uniformly. A uniform sub-block of the same aspect ratio keeps
   the Marchenko-Pastur bulk and a power-law spectrum's share; stratification
   removes the variance that outlier channels cause (see tests/test_metrics.py).
2. Excess kurtosis: population moments of all weights, m4 / m2^2 - 3, merged
   pooled exactly across row blocks and experts (`Moments`, raw power sums about a
   shift). Per-row kurtosis of the error sample is kept as a diagnostic.
3. Output noise amplification: the median over seeded unit probes x_i (Gaussian
   directions, `unit_probes`) of the relative output change ||E x_i|| / ||W x_i||,
   E = w_hat - W the candidate's real per-group quantization noise. (The pooled
   ratio ||E X||_F / ||W X||_F would only re-estimate metric 4: for isotropic
   probes its expectation is ||E||_F / ||W||_F for any W. The median is larger
   for matrices whose output energy lives in few directions; see
   `probe_median_ratio`.)
4. Reconstruction error: relative RMS error ||w_hat - W||_F / ||W||_F of MLX's
   affine quantize-dequantize (affine.py), for every candidate (bits, group).

Row samples: affine groups run along rows, so a uniform sample of whole rows
gives unbiased sums of squared errors; `candidate_sums` returns the raw sums so
that callers can pool them (row blocks, experts) before taking ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import affine


@dataclass(frozen=True)
class Moments:
    """Power sums of y = x - shift (float64), poolable by addition across blocks.

    Raw sums are exact to merge (sums about different shifts are re-expanded to
    one); the shift (the approximate mean, or 0 when the mean is negligible next
    to the spread) keeps the conversion to central moments free of cancellation.
    """

    n: int = 0
    shift: float = 0.0
    s1: float = 0.0
    s2: float = 0.0
    s3: float = 0.0
    s4: float = 0.0

    def __add__(self, other: Moments) -> Moments:
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        other = other.shifted(self.shift)
        return Moments(
            self.n + other.n,
            self.shift,
            self.s1 + other.s1,
            self.s2 + other.s2,
            self.s3 + other.s3,
            self.s4 + other.s4,
        )

    def shifted(self, shift: float) -> Moments:
        """The same moments as power sums about another shift (binomial expansion)."""
        if shift == self.shift:
            return self
        n, d = self.n, self.shift - shift  # x - new = (x - old) + d
        return Moments(
            n,
            shift,
            self.s1 + n * d,
            self.s2 + 2 * d * self.s1 + n * d * d,
            self.s3 + 3 * d * self.s2 + 3 * d * d * self.s1 + n * d**3,
            self.s4 + 4 * d * self.s3 + 6 * d * d * self.s2 + 4 * d**3 * self.s1 + n * d**4,
        )

    def _central(self) -> tuple[float, float, float]:
        n = self.n
        mu = self.s1 / n
        m2 = self.s2 / n - mu * mu
        m3 = self.s3 / n - 3 * mu * self.s2 / n + 2 * mu**3
        m4 = self.s4 / n - 4 * mu * self.s3 / n + 6 * mu * mu * self.s2 / n - 3 * mu**4
        return m2, m3, m4

    @property
    def mean(self) -> float:
        return self.shift + self.s1 / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        return max(self._central()[0], 0.0) if self.n else 0.0

    @property
    def excess_kurtosis(self) -> float:
        """Population excess kurtosis m4 / m2^2 - 3; 0 for a constant (or empty) set."""
        if self.n == 0:
            return 0.0
        m2, _, m4 = self._central()
        if m2 <= 1e-30 * max(self.s2 / self.n, 1e-300):
            return 0.0
        return m4 / (m2 * m2) - 3.0

    @staticmethod
    def of(x: np.ndarray, shift: float = 0.0) -> Moments:
        return block_stats(np.asarray(x, np.float32).reshape(1, -1), shift)[0]


def choose_shift(first_block: np.ndarray) -> float:
    """0 when the mean is negligible next to the spread (the usual weight matrix), else
    the mean rounded to float32, so that raw power sums stay well conditioned. Judged
    on the first 64K values: only the order of magnitude matters."""
    x = np.asarray(first_block).reshape(-1)[: 1 << 16].astype(np.float64)
    mean, std = float(x.mean()), float(x.std())
    return 0.0 if abs(mean) <= 0.05 * std else float(np.float32(mean))


def block_stats(x: np.ndarray, shift: float = 0.0) -> tuple[Moments, np.ndarray, np.ndarray]:
    """(Moments, row energies, column energies) of a 2-D float32 block.

    Energies are sums of squares of y = x - shift, in float64. Per-row float32
    sums (short, so accurate) are added in float64; einsum keeps it single-threaded
    and reproducible.
    """
    y = x if shift == 0.0 else x - np.float32(shift)
    y2 = y * y
    rows_sq = y2.sum(axis=1, dtype=np.float32).astype(np.float64)
    moments = Moments(
        n=int(y.size),
        shift=float(shift),
        s1=float(y.sum(axis=1, dtype=np.float32).sum(dtype=np.float64)),
        s2=float(rows_sq.sum()),
        s3=float(np.einsum("ij,ij->i", y2, y).sum(dtype=np.float64)),
        s4=float(np.einsum("ij,ij->i", y2, y2).sum(dtype=np.float64)),
    )
    return moments, rows_sq, y2.sum(axis=0, dtype=np.float64)


def excess_kurtosis(x: np.ndarray) -> float:
    return Moments.of(x).excess_kurtosis


def row_excess_kurtosis(rows: np.ndarray) -> np.ndarray:
    """Excess kurtosis of each row (population moments), float64 per row."""
    rows = np.asarray(rows, dtype=np.float64)
    d = rows - rows.mean(axis=1, keepdims=True)
    m2 = np.mean(d * d, axis=1)
    m4 = np.mean(d**4, axis=1)
    safe = np.where(m2 > 0, m2, 1.0)
    return np.where(m2 > 0, m4 / (safe * safe) - 3.0, 0.0)


def top_k_count(shape: tuple[int, int], fraction: float) -> int:
    return max(1, math.ceil(fraction * min(shape)))


def spectral_concentration(w: np.ndarray, fraction: float = 0.1) -> float:
    """Exact share of ||w||_F^2 held by the top ceil(fraction*min(m,n)) singular values."""
    w = np.asarray(w, dtype=np.float32)
    m, n = w.shape
    gram = w.T @ w if m >= n else w @ w.T  # the smaller Gram matrix; eigenvalues = s_i^2
    eig = np.linalg.eigvalsh(gram.astype(np.float64))
    eig = np.clip(eig, 0.0, None)[::-1]
    total = float(eig.sum())
    if total <= 0.0:
        return float(fraction)  # an all-zero matrix has a flat (empty) spectrum
    return float(eig[: top_k_count((m, n), fraction)].sum() / total)


def stratified_indices(
    energy: np.ndarray, size: int, rng: np.random.Generator, outlier_ratio: float = 4.0
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted indices, float32 weights) of a sample of `size` out of len(energy) lines.

    Lines whose energy exceeds `outlier_ratio` x the mean are always taken (at most a
    quarter of the sample) with weight sqrt(p), p the inclusion probability of the
    others, which are drawn uniformly with weight 1: the weighted sub-block is then an
    unbiased, scaled-down copy of the whole, without the variance of hitting or
    missing an outlier channel.
    """
    total = energy.shape[0]
    if size >= total:
        return np.arange(total), np.ones(total, dtype=np.float32)
    order = np.argsort(-energy, kind="stable")[: size // 4]
    forced = np.sort(order[energy[order] > outlier_ratio * float(np.mean(energy))])
    rest = np.setdiff1d(np.arange(total), forced, assume_unique=True)
    drawn = rng.choice(rest, size=size - forced.size, replace=False)
    p = drawn.size / rest.size
    idx = np.concatenate([forced, drawn])
    weights = np.concatenate([np.full(forced.size, math.sqrt(p)), np.ones(drawn.size)])
    order = np.argsort(idx, kind="stable")
    return idx[order], weights[order].astype(np.float32)


def sub_block_shape(shape: tuple[int, int], max_dim: int) -> tuple[int, int]:
    """Rows and columns of an aspect-preserving sub-block whose smaller side is max_dim."""
    m, n = shape
    scale = min(1.0, max_dim / min(m, n))
    return max(1, min(m, round(scale * m))), max(1, min(n, round(scale * n)))


def unit_probes(in_dim: int, count: int, seed: int) -> np.ndarray:
    """Seeded Gaussian probe matrix (in_dim, count) with unit-norm columns."""
    rng = np.random.default_rng([seed, in_dim, count])
    x = rng.standard_normal((in_dim, count), dtype=np.float32)
    x /= np.linalg.norm(x, axis=0, keepdims=True)
    return x


@dataclass(frozen=True)
class ErrorSums:
    """Raw sums behind one candidate's two ratios, poolable (by +) across samples."""

    err_sq: float  # ||E||_F^2
    w_sq: float  # ||W||_F^2
    err_probe_sq: np.ndarray  # ||E x_i||^2 for each probe x_i
    w_probe_sq: np.ndarray  # ||W x_i||^2 for each probe x_i

    def __add__(self, other: ErrorSums) -> ErrorSums:
        return ErrorSums(
            self.err_sq + other.err_sq,
            self.w_sq + other.w_sq,
            self.err_probe_sq + other.err_probe_sq,
            self.w_probe_sq + other.w_probe_sq,
        )

    @property
    def rel_rms_error(self) -> float:
        return math.sqrt(self.err_sq / self.w_sq) if self.w_sq > 0 else 0.0

    @property
    def noise_amplification(self) -> float:
        """Median over probes of ||E x_i|| / ||W x_i||."""
        return probe_median_ratio(self.err_probe_sq, self.w_probe_sq)


def probe_median_ratio(err_probe_sq: np.ndarray, w_probe_sq: np.ndarray) -> float:
    """Median of sqrt(err_i / w_i) over probes whose output ||W x_i|| is not zero.

    The median, not the pooled ratio: for isotropic probes the pooled ratio
    sum ||E x_i||^2 / sum ||W x_i||^2 estimates exactly the relative error (metric 4)
    whatever W is. Per probe, a matrix whose energy sits in few directions gives
    most probes a weak output ||W x|| against full-rank quantization noise, so its
    median ratio exceeds the relative error; a flat spectrum keeps them equal.
    """
    valid = w_probe_sq > 0
    if not np.any(valid):
        return 0.0
    return float(np.median(np.sqrt(err_probe_sq[valid] / w_probe_sq[valid])))


def _sum_sq(x: np.ndarray, d: np.ndarray | None = None) -> float:
    # einsum: numpy's own loop, single-threaded and so reproducible bit for bit.
    if d is None:
        return float(np.einsum("ij,ij->", x, x, dtype=np.float64))
    return float(np.einsum("ij,ij,j->", x, x, d, dtype=np.float64))


def _column_sq(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->j", x, x, dtype=np.float64)


def candidate_sums(
    w: np.ndarray,
    candidates: list[tuple[int, int]],
    probes: np.ndarray,
    scale_dtype: str = "float32",
    importance: np.ndarray | None = None,
) -> list[ErrorSums]:
    """ErrorSums of quantize-dequantize of rows w (r, in) for each (bits, group_size).

    importance: per-input-channel second moments E[x_j^2] (an imatrix); with them the
    reconstruction sums weight column j by them, so the relative error is
    E||(W - W_hat) x||^2 / E||W x||^2 for inputs with those moments."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    d = None if importance is None else np.asarray(importance, dtype=np.float64)
    w_sq = _sum_sq(w, d)
    w_probe_sq = _column_sq(w @ probes)
    out = []
    for bits, group_size in candidates:
        err = affine.quantize_dequantize(w, bits, group_size, scale_dtype)
        err -= w
        out.append(ErrorSums(_sum_sq(err, d), w_sq, _column_sq(err @ probes), w_probe_sq))
    return out


def noise_amplification(w: np.ndarray, err: np.ndarray, probes: np.ndarray) -> float:
    """Median over probe columns x_i of ||E x_i|| / ||W x_i|| (reference form, for tests)."""
    out_w = np.linalg.norm(np.asarray(w, np.float64) @ probes, axis=0)
    out_e = np.linalg.norm(np.asarray(err, np.float64) @ probes, axis=0)
    valid = out_w > 0
    return float(np.median(out_e[valid] / out_w[valid])) if np.any(valid) else 0.0

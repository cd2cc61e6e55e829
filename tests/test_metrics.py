"""The SWAN metrics against straightforward reference computations on small matrices."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from swan_serve.quant import affine, metrics


def _laplace(rng: np.random.Generator, shape: tuple[int, ...], mean: float = 0.0) -> np.ndarray:
    return (rng.laplace(size=shape) * 0.02 + mean).astype(np.float32)


def _reference_kurtosis(x: np.ndarray) -> float:
    d = x.astype(np.float64).ravel()
    d = d - d.mean()
    return float(np.mean(d**4) / np.mean(d**2) ** 2 - 3.0)


def _reference_share(w: np.ndarray, fraction: float) -> float:
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    k = math.ceil(fraction * min(w.shape))
    return float(np.sum(s[:k] ** 2) / np.sum(w.astype(np.float64) ** 2))


@pytest.mark.parametrize("mean", [0.0, 0.05])
def test_pooled_block_moments_give_the_population_kurtosis(mean: float) -> None:
    w = _laplace(np.random.default_rng(0), (300, 256), mean)
    shift = metrics.choose_shift(w[:50])
    assert (shift == 0.0) == (mean == 0.0)
    pooled = metrics.Moments()
    for start in range(0, 300, 64):  # uneven blocks, pooled by addition
        pooled = pooled + metrics.block_stats(w[start : start + 64], shift)[0]
    assert pooled.n == w.size
    assert pooled.mean == pytest.approx(float(w.astype(np.float64).mean()), rel=1e-6)
    assert pooled.variance == pytest.approx(float(w.astype(np.float64).var()), rel=1e-5)
    assert pooled.excess_kurtosis == pytest.approx(_reference_kurtosis(w), rel=1e-5)
    assert metrics.excess_kurtosis(w) == pytest.approx(_reference_kurtosis(w), rel=1e-5)
    # A Laplace distribution has excess kurtosis 3.
    assert 2.5 < pooled.excess_kurtosis < 3.5


def test_block_stats_energies_and_degenerate_kurtosis() -> None:
    w = _laplace(np.random.default_rng(1), (40, 96))
    _, rows, cols = metrics.block_stats(w)
    np.testing.assert_allclose(rows, np.sum(w.astype(np.float64) ** 2, axis=1), rtol=1e-6)
    np.testing.assert_allclose(cols, np.sum(w.astype(np.float64) ** 2, axis=0), rtol=1e-6)
    assert metrics.excess_kurtosis(np.full((4, 32), 0.5, np.float32)) == 0.0


def test_row_kurtosis_matches_per_row_reference() -> None:
    w = _laplace(np.random.default_rng(2), (6, 512))
    expected = [_reference_kurtosis(row) for row in w]
    np.testing.assert_allclose(metrics.row_excess_kurtosis(w), expected, rtol=1e-9)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)])
def test_spectral_concentration_equals_the_svd_share(shape: tuple[int, int]) -> None:
    w = _laplace(np.random.default_rng(3), shape)
    assert metrics.spectral_concentration(w, 0.1) == pytest.approx(
        _reference_share(w, 0.1), rel=1e-6
    )


def test_spectral_concentration_bounds() -> None:
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((80, 80)))
    # Every singular value equal: the top 10% hold exactly 10% of the energy.
    assert metrics.spectral_concentration(q.astype(np.float32), 0.1) == pytest.approx(0.1, abs=1e-5)
    rank_one = np.outer(np.arange(1, 65), np.linspace(-1, 1, 48)).astype(np.float32)
    assert metrics.spectral_concentration(rank_one, 0.1) == pytest.approx(1.0, abs=1e-6)


def _spiky(rng: np.random.Generator, m: int, n: int) -> np.ndarray:
    """Laplace weights with a decaying low-rank part and a few loud input channels."""
    w = rng.laplace(size=(m, n))
    u, v = rng.standard_normal((m, 8)), rng.standard_normal((8, n))
    w += 0.6 * (u * (0.8 ** np.arange(8))) @ v
    w[:, rng.choice(n, 4, replace=False)] *= 6.0
    return (w * 0.02).astype(np.float32)


def test_stratified_sub_block_estimates_the_full_share() -> None:
    rng = np.random.default_rng(5)
    w = _spiky(rng, 1024, 768)
    exact = _reference_share(w, 0.1)
    rows = np.sum(w.astype(np.float64) ** 2, axis=1)
    cols = np.sum(w.astype(np.float64) ** 2, axis=0)
    estimates = []
    for seed in range(4):
        sample_rng = np.random.default_rng(seed)
        r_idx, r_w = metrics.stratified_indices(rows, 256, sample_rng)
        c_idx, c_w = metrics.stratified_indices(cols, 192, sample_rng)
        sub = w[np.ix_(r_idx, c_idx)] * r_w[:, None] * c_w[None, :]
        estimates.append(metrics.spectral_concentration(sub, 0.1))
    assert abs(np.mean(estimates) - exact) < 0.1 * exact
    assert np.std(estimates) < 0.03 * exact


def test_stratified_indices_always_keep_loud_lines() -> None:
    energy = np.ones(1000)
    energy[[7, 500]] = 50.0
    idx, weights = metrics.stratified_indices(energy, 100, np.random.default_rng(0))
    assert idx.size == 100 and np.all(np.diff(idx) > 0)
    p = 98 / 998
    assert weights[idx == 7][0] == pytest.approx(math.sqrt(p))
    assert weights[idx == 500][0] == pytest.approx(math.sqrt(p))
    assert np.sum(weights == 1.0) == 98
    all_idx, all_w = metrics.stratified_indices(energy, 2000, np.random.default_rng(0))
    assert all_idx.size == 1000 and np.all(all_w == 1.0)
    assert metrics.sub_block_shape((4096, 12288), 512) == (512, 1536)
    assert metrics.sub_block_shape((100, 40), 512) == (100, 40)


def test_unit_probes_are_seeded_unit_columns() -> None:
    x = metrics.unit_probes(128, 16, seed=0)
    assert x.shape == (128, 16) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=0), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(x, metrics.unit_probes(128, 16, seed=0))
    assert not np.array_equal(x, metrics.unit_probes(128, 16, seed=1))


def test_candidate_sums_match_mlx_quantization_error() -> None:
    wm = mx.array(_laplace(np.random.default_rng(6), (32, 256))).astype(mx.bfloat16)
    w = np.array(wm.astype(mx.float32))
    probes = metrics.unit_probes(256, 8, seed=0)
    candidates = [(2, 32), (4, 64), (8, 128)]
    sums = metrics.candidate_sums(w, candidates, probes, scale_dtype="bfloat16")
    for (bits, group), s in zip(candidates, sums, strict=True):
        q, scales, biases = mx.quantize(wm, group_size=group, bits=bits)
        # Dequantize with float32 scales/biases: the analysis measures the weights' error
        # before the output is rounded back to bf16.
        w_hat = np.array(
            mx.dequantize(
                q, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group, bits=bits
            )
        )
        err = (w_hat - w).astype(np.float64)
        expected = np.linalg.norm(err) / np.linalg.norm(w.astype(np.float64))
        assert s.rel_rms_error == pytest.approx(expected, rel=1e-5)
        assert s.noise_amplification == pytest.approx(
            metrics.noise_amplification(w, err, probes), rel=1e-5
        )
    assert sums[0].rel_rms_error > sums[1].rel_rms_error > sums[2].rel_rms_error


def test_error_sums_pool_like_one_matrix() -> None:
    w = _laplace(np.random.default_rng(7), (64, 128))
    probes = metrics.unit_probes(128, 4, seed=0)
    whole = metrics.candidate_sums(w, [(3, 64)], probes)[0]
    halves = (
        metrics.candidate_sums(w[:20], [(3, 64)], probes)[0]
        + metrics.candidate_sums(w[20:], [(3, 64)], probes)[0]
    )
    assert halves.rel_rms_error == pytest.approx(whole.rel_rms_error, rel=1e-6)
    assert halves.noise_amplification == pytest.approx(whole.noise_amplification, rel=1e-6)
    assert whole.rel_rms_error == pytest.approx(affine.rel_rms_error(w, 3, 64), rel=1e-6)


def test_noise_amplification_is_the_median_per_probe_output_change() -> None:
    """White noise on a flat-spectrum W: about the relative error. On a rank-one W most
    random directions barely excite W, so the median per-probe change is larger:
    ||W x||^2 ~ chi^2_1 / n against ||E x||^2 ~ ||E||^2 / n, a factor
    1 / sqrt(median chi^2_1) = 1.48 over the relative error."""
    rng = np.random.default_rng(8)
    probes = metrics.unit_probes(256, 4096, seed=0)
    flat = _laplace(rng, (256, 256))
    rank_one = np.outer(rng.standard_normal(256), rng.standard_normal(256)).astype(np.float32)
    for w, factor in ((flat, 1.0), (rank_one, 1.0 / math.sqrt(0.4549))):
        noise = rng.standard_normal(w.shape) * 0.01 * np.std(w)
        rel = np.linalg.norm(noise) / np.linalg.norm(w)
        assert metrics.noise_amplification(w, noise, probes) == pytest.approx(
            factor * rel, rel=0.08
        )


def test_moments_about_different_shifts_pool_exactly() -> None:
    rng = np.random.default_rng(9)
    a, b = _laplace(rng, (10, 64), 0.3), _laplace(rng, (12, 64), -0.2)
    pooled = metrics.block_stats(a, 0.3)[0] + metrics.block_stats(b, -0.2)[0]
    both = np.concatenate([a, b])
    assert pooled.mean == pytest.approx(float(both.astype(np.float64).mean()), rel=1e-6)
    assert pooled.excess_kurtosis == pytest.approx(_reference_kurtosis(both), rel=1e-6)

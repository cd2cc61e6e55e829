"""quant/fit.py: fitted groups are valid MLX groups and beat mx.quantize's rounding."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from swan_serve.quant import affine, fit
from swan_serve.quant.sources.checkpoint import open_checkpoint

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
MX_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def heavy_tailed(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Student-t weights: trained matrices have tails like this (a few big outliers)."""
    w = np.random.default_rng(seed).standard_t(4, size=shape).astype(np.float32) * 0.02
    return affine.round_to_dtype(w, "bfloat16")


def group_sse(w, codes, scales, biases, group_size) -> np.ndarray:
    diff = affine.dequantize(codes, scales, biases, group_size) - w
    return (diff.reshape(-1, group_size).astype(np.float64) ** 2).sum(axis=1)


@pytest.mark.parametrize("bits", affine.SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", affine.SUPPORTED_GROUP_SIZES)
def test_fitted_groups_dequantize_in_mlx_as_in_numpy(bits, group_size):
    w = heavy_tailed((48, 256), seed=bits)
    for dtype in ("bfloat16", "float16", "float32"):
        codes, scales, biases = fit.fit(w, bits, group_size, dtype)
        assert codes.dtype == np.uint8 and codes.shape == w.shape
        assert codes.max() <= (1 << bits) - 1
        assert scales.shape == biases.shape == (48, 256 // group_size)
        # Scales and biases are already values of the storage dtype.
        assert np.array_equal(affine.round_to_dtype(scales, dtype), scales)
        assert np.array_equal(affine.round_to_dtype(biases, dtype), biases)
        packed = mx.array(affine.pack(codes, bits))
        ours = affine.dequantize(codes, scales, biases, group_size, out_dtype=dtype)
        theirs = mx.dequantize(
            packed,
            mx.array(scales).astype(MX_DTYPES[dtype]),
            mx.array(biases).astype(MX_DTYPES[dtype]),
            group_size=group_size,
            bits=bits,
        )
        assert np.array_equal(np.array(theirs.astype(mx.float32)), ours), dtype


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 64), (4, 128), (8, 64)])
def test_no_group_is_worse_than_mx_quantize(bits, group_size):
    w = heavy_tailed((64, 512), seed=1)
    codes, scales, biases = fit.fit(w, bits, group_size, "bfloat16")
    ours = group_sse(w, codes, scales, biases, group_size)
    q, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=group_size, bits=bits)
    mlx_hat = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32),
                            group_size=group_size, bits=bits)
    theirs = ((np.array(mlx_hat) - w).reshape(-1, group_size).astype(np.float64) ** 2).sum(1)
    assert np.all(ours <= theirs * (1 + 1e-6) + 1e-12)
    assert ours.sum() < 0.9 * theirs.sum()


def test_clear_gain_at_4_bit_group_64():
    w = heavy_tailed((256, 1024), seed=2)
    codes, scales, biases = fit.fit(w, 4, 64, "bfloat16")
    c0, s0, b0 = affine.quantize(w, 4, 64, "bfloat16")  # bit-exact model of mx.quantize
    ratio = fit.relative_mse(w, codes, scales, biases, 64) / fit.relative_mse(w, c0, s0, b0, 64)
    assert ratio < 0.85


@pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/models/stories260K")
def test_trained_weights_reach_target_ratio():
    ckpt = open_checkpoint(STORIES)
    ours = mlx = 0.0
    for t in ckpt.tensors:
        if t.ndim == 2 and t.shape[1] % 64 == 0:
            w = affine.round_to_dtype(ckpt.read(t.name), "bfloat16")
            ours += fit.relative_mse(w, *fit.fit(w, 4, 64, "bfloat16"), 64)
            mlx += fit.relative_mse(w, *affine.quantize(w, 4, 64, "bfloat16"), 64)
    assert ours / mlx <= 0.85


def test_stacked_experts_fit_like_each_expert():
    w = heavy_tailed((3, 16, 128), seed=3)
    codes, scales, biases = fit.fit(w, 4, 32, "bfloat16")
    assert codes.shape == w.shape and scales.shape == (3, 16, 4)
    one = fit.fit(w[1], 4, 32, "bfloat16")
    assert np.array_equal(codes[1], one[0]) and np.array_equal(scales[1], one[1])


def test_degenerate_groups_are_exact():
    w = np.zeros((4, 64), dtype=np.float32)
    w[1] = 0.5  # constant group
    w[2, :32] = -3.0
    codes, scales, biases = fit.fit(w, 4, 32, "float16")
    assert np.all(np.isfinite(scales)) and np.all(scales != 0)
    assert np.array_equal(affine.dequantize(codes, scales, biases, 32), w)


def test_large_input_is_fitted_in_blocks_with_the_same_result():
    w = heavy_tailed((2 * (fit._BLOCK_ELEMENTS // 64) + 3, 64), seed=4)
    codes, scales, _ = fit.fit(w, 3, 64, "bfloat16", fit.FAST)
    tail = fit.fit(w[-3:], 3, 64, "bfloat16", fit.FAST)
    assert np.array_equal(codes[-3:], tail[0]) and np.array_equal(scales[-3:], tail[1])


@pytest.mark.parametrize(
    "bits,group_size,in_dim,dtype",
    [(7, 64, 128, "bfloat16"), (4, 48, 96, "bfloat16"), (4, 64, 96, "bfloat16"),
     (4, 64, 128, "int8")],
)
def test_bad_settings_are_refused(bits, group_size, in_dim, dtype):
    with pytest.raises(ValueError):
        fit.fit(np.ones((2, in_dim), np.float32), bits, group_size, dtype)

"""quant/affine.py agrees bit for bit with mx.quantize / mx.dequantize."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from swan_serve.quant import affine

BITS = affine.SUPPORTED_BITS
GROUPS = affine.SUPPORTED_GROUP_SIZES
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Heavy-tailed weights with the groups that exercise every branch of MLX's rule."""
    w = (rng.laplace(size=shape) * 0.02).astype(np.float32)
    flat = w.reshape(-1, shape[-1])
    flat[0, :128] = 0.0  # all-zero groups: scale falls back to eps
    flat[1, :128] = 0.0125  # constant groups
    flat[2, :128] = np.abs(flat[2, :128])  # all positive: the edge is w_max side
    flat[3, :128] = -np.abs(flat[3, :128])  # all negative
    flat[4, 5] = 0.75  # one large outlier
    flat[5, :128] *= 1e-6  # tiny values: q0 rounds to 0, bias is 0
    return w


def _mx_in(w: np.ndarray, dtype: str) -> tuple[mx.array, np.ndarray]:
    """The MLX array in `dtype` and its exact float32 values (what numpy analyses)."""
    wm = mx.array(w).astype(DTYPES[dtype])
    return wm, np.array(wm.astype(mx.float32))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits", BITS)
def test_quantize_pack_and_dequantize_match_mlx_bit_for_bit(dtype: str, bits: int) -> None:
    rng = np.random.default_rng(bits)
    wm, w = _mx_in(_weights(rng, (12, 256)), dtype)
    for group in GROUPS:
        q_mx, s_mx, b_mx = mx.quantize(wm, group_size=group, bits=bits)
        codes, scales, biases = affine.quantize(w, bits, group, scale_dtype=dtype)
        assert np.array_equal(affine.pack(codes, bits), np.array(q_mx))
        assert np.array_equal(scales, np.array(s_mx.astype(mx.float32)))
        assert np.array_equal(biases, np.array(b_mx.astype(mx.float32)))
        assert np.array_equal(affine.unpack(np.array(q_mx), bits, w.shape[-1]), codes)
        deq_mx = mx.dequantize(q_mx, s_mx, b_mx, group_size=group, bits=bits)
        deq = affine.dequantize(codes, scales, biases, group, out_dtype=dtype)
        assert np.array_equal(deq, np.array(deq_mx.astype(mx.float32)))


def test_stacked_experts_quantize_like_mlx() -> None:
    """Leading axes ([E, out, in], as MLX's SwitchLinear stores experts) are rows too."""
    wm, w = _mx_in(_weights(np.random.default_rng(7), (3, 8, 128)), "bfloat16")
    q_mx, s_mx, b_mx = mx.quantize(wm, group_size=64, bits=3)
    codes, scales, biases = affine.quantize(w, 3, 64, scale_dtype="bfloat16")
    assert codes.shape == w.shape and scales.shape == (3, 8, 2)
    assert np.array_equal(affine.pack(codes, 3), np.array(q_mx))
    assert np.array_equal(scales, np.array(s_mx.astype(mx.float32)))


def test_quantize_dequantize_equals_the_two_step_path_and_rel_error() -> None:
    _, w = _mx_in(_weights(np.random.default_rng(3), (16, 512)), "bfloat16")
    for bits in BITS:
        codes, scales, biases = affine.quantize(w, bits, 64, scale_dtype="bfloat16")
        two_step = affine.dequantize(codes, scales, biases, 64)
        np.testing.assert_array_equal(affine.quantize_dequantize(w, bits, 64, "bfloat16"), two_step)
        expected = np.linalg.norm((two_step - w).astype(np.float64)) / np.linalg.norm(
            w.astype(np.float64)
        )
        assert affine.rel_rms_error(w, bits, 64, "bfloat16") == pytest.approx(expected, rel=1e-9)


def test_more_bits_and_smaller_groups_give_smaller_error() -> None:
    w = (np.random.default_rng(4).standard_normal((64, 512)) * 0.02).astype(np.float32)
    errors = {(b, g): affine.rel_rms_error(w, b, g) for b in BITS for g in GROUPS}
    for g in GROUPS:
        by_bits = [errors[(b, g)] for b in BITS]
        assert by_bits == sorted(by_bits, reverse=True)
    for b in BITS:
        assert errors[(b, 32)] < errors[(b, 64)] < errors[(b, 128)]
    # Gaussian weights, 4 bits, group 64: a uniform quantizer's error is ~0.09 of the RMS.
    assert 0.06 < errors[(4, 64)] < 0.13


def test_round_to_bfloat16_matches_mlx() -> None:
    x = np.random.default_rng(5).standard_normal(10_000).astype(np.float32) * 1e-3
    x[:4] = [0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8]  # exact ties round to even
    expected = np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32))
    np.testing.assert_array_equal(affine.round_to_dtype(x, "bfloat16"), expected)


def test_pack_unpack_round_trip_for_every_width() -> None:
    rng = np.random.default_rng(6)
    for bits in BITS:
        codes = rng.integers(0, 2**bits, size=(5, 96), dtype=np.uint8)
        packed = affine.pack(codes, bits)
        assert packed.dtype == np.uint32 and packed.shape == (5, 96 * bits // 32)
        np.testing.assert_array_equal(affine.unpack(packed, bits, 96), codes)


def test_bits_per_weight_counts_scale_and_bias() -> None:
    assert affine.bits_per_weight(4, 64) == 4.5
    assert affine.bits_per_weight(2, 32) == 3.0
    assert affine.bits_per_weight(8, 128) == 8.25


@pytest.mark.parametrize(
    ("bits", "group", "width", "message"),
    [(7, 64, 128, "bits"), (4, 16, 128, "group_size"), (4, 64, 96, "divisible")],
)
def test_unsupported_settings_are_refused(bits: int, group: int, width: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        affine.quantize(np.zeros((2, width), np.float32), bits, group)

"""quant/modes.py against mx.quantize / mx.dequantize: bit for bit, every mode and dtype."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import swan_serve
from swan_serve.quant import modes

_MX = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    zeros = np.zeros((4, 64), np.float32)
    zeros[1, 5] = -0.0
    fp4_ties = rng.choice(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25,
                                    -1.75, -2.5, -3.5, -5], np.float32), (16, 128))
    fp4_ties[:, ::16] = 6.0  # pins every scale to 1, so the values above are exact ties
    fp8_ties = (rng.integers(-200, 200, (16, 128)) / 16 + 1 / 32).astype(np.float32)
    fp8_ties[:, ::16] = 448.0
    wide = rng.standard_normal((32, 128)) * np.exp2(rng.uniform(-60, 60, (32, 1)))
    return {
        "normal": (rng.standard_normal((32, 128)) * 0.02).astype(np.float32),
        "heavy_tailed": (rng.standard_t(1.5, (32, 128)) * 0.01).astype(np.float32),
        "tiny": (rng.standard_normal((8, 128)) * 1e-30).astype(np.float32),
        "subnormal": (rng.standard_normal((8, 128)) * 1e-40).astype(np.float32),
        "zero": zeros,
        "huge": (rng.standard_normal((8, 128)) * 1e4).astype(np.float32),
        "huger": (rng.standard_normal((8, 128)) * 1e11).astype(np.float32),
        "wide_range": wide.astype(np.float32),
        "fp4_ties": fp4_ties,
        "fp8_ties": fp8_ties,
    }


CASES = _cases()


def _check_like_mlx(w: np.ndarray, mode: str, dtype: str) -> None:
    w_mx = mx.array(w).astype(_MX[dtype])
    w_np = np.array(w_mx.astype(mx.float32))  # the values MLX actually quantizes
    packed, scales = (np.array(a) for a in mx.quantize(w_mx, mode=mode))
    our_packed, our_scales = modes.quantize(w_np, mode, dtype)
    np.testing.assert_array_equal(our_scales, scales)
    np.testing.assert_array_equal(our_packed, packed)
    deq = np.array(mx.dequantize(mx.array(packed), mx.array(scales), mode=mode,
                                 dtype=mx.float32))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(modes.dequantize(our_packed, our_scales, mode), deq)
        np.testing.assert_array_equal(modes.quantize_dequantize(w_np, mode, dtype), deq)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("mode", modes.FLOAT_MODES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_quantize_matches_mlx_bit_for_bit(case: str, mode: str, dtype: str) -> None:
    w = CASES[case]
    if dtype == "float16" and np.abs(w).max() > 65504:
        pytest.skip("values overflow float16")
    _check_like_mlx(w, mode, dtype)


@pytest.mark.parametrize("mode", modes.FLOAT_MODES)
def test_demo_model_weights_match_mlx(mode: str) -> None:
    weights = mx.load(str(swan_serve.DEMO_MODEL_DIR / "model.safetensors"))
    names = sorted(k for k, v in weights.items() if v.ndim == 2 and v.shape[-1] % 32 == 0)
    assert names
    for name in names[:: max(1, len(names) // 12)]:  # a dozen tensors of every kind
        w = weights[name]
        dtype = {mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(w.dtype, "float32")
        _check_like_mlx(np.array(w.astype(mx.float32)), mode, dtype)


def test_stacked_experts_quantize_like_mlx() -> None:
    w = np.random.default_rng(1).standard_normal((3, 8, 64)).astype(np.float32)
    for mode in modes.FLOAT_MODES:
        packed, scales = (np.array(a) for a in mx.quantize(mx.array(w), mode=mode))
        ours = modes.quantize(w, mode)
        np.testing.assert_array_equal(ours[0], packed)
        np.testing.assert_array_equal(ours[1], scales)


def test_error_is_dequantized_minus_w_and_orders_the_modes() -> None:
    w = (np.random.default_rng(2).standard_normal((64, 256)) * 0.05).astype(np.float32)
    for mode in modes.FLOAT_MODES:
        packed, scales = modes.quantize(w, mode)
        np.testing.assert_array_equal(modes.error(w, mode),
                                      modes.dequantize(packed, scales, mode) - w)
    errors = {m: modes.rel_rms_error(w, m) for m in modes.FLOAT_MODES}
    assert errors["mxfp8"] < errors["nvfp4"] < errors["mxfp4"]  # 8 bits; finer scales
    assert modes.rel_rms_error(np.zeros((2, 32), np.float32), "mxfp4") == 0.0


def test_bits_per_weight_and_bad_input() -> None:
    assert modes.bits_per_weight("mxfp4") == 4.25
    assert modes.bits_per_weight("nvfp4") == 4.5
    assert modes.bits_per_weight("mxfp8") == 8.25
    with pytest.raises(ValueError, match="mode must be one of"):
        modes.quantize(np.zeros((2, 32), np.float32), "fp3")
    with pytest.raises(ValueError, match="not divisible by 32"):
        modes.quantize(np.zeros((2, 48), np.float32), "nvfp4")

"""A numpy model of MLX's microscaling float modes (``mx.quantize(w, mode=...)``).

mxfp4: FP4 (e2m1) codes, groups of 32, one e8m0 (power of two) scale per group.
mxfp8: FP8 (e4m3) codes, groups of 32, one e8m0 scale per group.
nvfp4: FP4 (e2m1) codes, groups of 16, one e4m3 scale per group.
No biases. It reproduces mx.quantize bit for bit (packed uint32 codes, uint8
scales; tests/test_modes.py checks it against MLX), so the analyzer and the
converter can quantize and measure error in numpy, as affine.py does.

MLX's rules, per group, with arithmetic in the weight's dtype ``dtype``:

    s     = max|w| / (6 or 448)                           (rounded to dtype)
    e8m0: e = smallest integer with 2**e >= s (0 when s == 0), stored e + 127
          (wrapped to 8 bits); x = w / 2**e                (2**e in dtype)
    e4m3: s8 = to_e4m3(s) (round to nearest even, >= 448 saturates to 448);
          x = w / value(s8)                                (rounded to dtype)
    fp8 code  = to_e4m3(x)           (-0.0 keeps its sign bit)
    fp4 code  = argmin_k |x - LUT[k]| over LUT = [+0, .5, 1, 1.5, 2, 3, 4, 6,
                -0, -.5, ..., -6] (float32 differences), the first k on a tie:
                halfway values round toward zero, and zero is always +0.
    w_hat = value(code) * scale

mlx 0.32.x rounds the e8m0 exponent UP (so x never exceeds the format's
largest value); the OCP spec and older MLX round it to nearest.

API (vectorised over leading dimensions):
    quantize(w, mode, dtype="float32") -> (packed uint32 (..., in*bits//32), scales uint8)
    dequantize(packed, scales, mode) -> float32
    quantize_dequantize(w, mode, dtype="float32") -> float32 w_hat
    error(w, mode, dtype="float32") -> w_hat - w;  rel_rms_error(...)
"""

from __future__ import annotations

import math

import numpy as np

from .affine import pack, round_to_dtype, unpack

FLOAT_MODES = ("mxfp4", "mxfp8", "nvfp4")
GROUP_SIZE = {"mxfp4": 32, "mxfp8": 32, "nvfp4": 16}
BITS = {"mxfp4": 4, "mxfp8": 8, "nvfp4": 4}
_MAX = {4: np.float32(6.0), 8: np.float32(448.0)}
FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6],
                      dtype=np.float32)
_FP8_SATURATE = np.uint32(0x43E00000)  # bits of 448.0: at or above it -> 448
_FP8_SUBNORMAL = np.uint32(121 << 23)  # below 2**-6: subnormal e4m3
_FP8_DENORM_MAGIC = np.uint32(141 << 23)  # 2**14: adding it rounds to multiples of 2**-9


def check_mode(mode: str, in_dim: int | None = None) -> None:
    """Raise ValueError unless MLX can quantize a width-in_dim weight with `mode`."""
    if mode not in FLOAT_MODES:
        raise ValueError(f"mode must be one of {FLOAT_MODES}, got {mode!r}")
    if in_dim is not None and in_dim % 32:  # MLX packs 8 codes per word, 32-wide rows
        raise ValueError(f"last dimension {in_dim} is not divisible by 32 ({mode})")


def bits_per_weight(mode: str) -> float:
    """Storage cost per weight: the codes plus one 8-bit scale per group."""
    return BITS[mode] + 8.0 / GROUP_SIZE[mode]


def to_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> e4m3 byte, round to nearest even, saturating at 448 (as MLX's ToFP8)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    sign = (bits >> np.uint32(24)) & np.uint32(0x80)
    mag = bits & np.uint32(0x7FFFFFFF)
    # Subnormal range: adding 2**14 leaves the value's multiple of 2**-9 in the low bits.
    low = (mag.view(np.float32) + _FP8_DENORM_MAGIC.view(np.float32)).view(np.uint32)
    low = low - _FP8_DENORM_MAGIC
    # Normal range: rebias the exponent and round the 20 dropped mantissa bits to even.
    odd = (mag >> np.uint32(20)) & np.uint32(1)
    high = (mag + np.uint32(((7 - 127) << 23) + 0x7FFFF & 0xFFFFFFFF) + odd) >> np.uint32(20)
    code = np.where(mag < _FP8_SUBNORMAL, low, high) & np.uint32(0xFF)
    code = np.where(mag >= _FP8_SATURATE, np.uint32(0x7E), code)
    return (code | sign).astype(np.uint8)


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, mant = (codes >> 3) & 0xF, codes & 0x7
    mag = np.where(exp == 0, mant / 8.0 * 2.0**-6, (1 + mant / 8.0) * 2.0 ** (exp - 7.0))
    mag = np.where((codes & 0x7F) == 0x7F, np.nan, mag)
    return (sign * mag).astype(np.float32)


E4M3_VALUES = _e4m3_table()


def _groups(w: np.ndarray, group_size: int) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 2:
        raise ValueError(f"quantize needs a 2-D (or stacked) array, got shape {w.shape}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def _scales(g: np.ndarray, mode: str, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored uint8 scale, the float32 divisor MLX uses) per group of g (..., groups, size)."""
    amax = np.abs(g).max(axis=-1)
    s = round_to_dtype(amax / _MAX[BITS[mode]], dtype)
    if mode == "nvfp4":
        s8 = to_e4m3(s)
        return s8, E4M3_VALUES[s8]
    mant, exp = np.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1); subnormals too
    e = np.where(s == 0, 0, np.where(mant == 0.5, exp - 1, exp))  # ceil(log2 s), exact
    # MLX stores e + 127 wrapped to 8 bits (only scales below 2**-127 wrap) and
    # divides by 2**e computed in the weight's dtype.
    divisor = round_to_dtype(np.ldexp(np.float32(1), e).astype(np.float32), dtype)
    return ((e + 127) & 0xFF).astype(np.uint8), divisor


def _fp4_codes(x: np.ndarray) -> np.ndarray:
    """argmin over the LUT of |x - value| in float32 (first on ties), as MLX computes it."""
    best = np.zeros(x.shape, dtype=np.uint8)
    best_d = np.full(x.shape, np.inf, dtype=np.float32)
    for k, v in enumerate(FP4_VALUES):
        d = np.abs(x - v)
        better = d < best_d
        best[better] = k
        best_d[better] = d[better]
    return best


def _codes(w: np.ndarray, mode: str, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 shaped like w, stored uint8 scales)."""
    g = _groups(w, GROUP_SIZE[mode])
    stored, divisor = _scales(g, mode, dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = round_to_dtype(g / divisor[..., None], dtype)
    # A zero nvfp4 scale gives inf/nan quotients, which MLX's argmin maps to code 0.
    x = np.where(np.isfinite(x), x, np.float32(0))
    codes = to_e4m3(x) if BITS[mode] == 8 else _fp4_codes(x)
    return codes.reshape(np.shape(w)), stored


def quantize(w: np.ndarray, mode: str, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Packed codes (uint32, (..., in * bits // 32)) and uint8 scales (..., in // group).

    dtype: the dtype MLX would compute in (the weight's own: bf16 for a bf16 checkpoint).
    """
    check_mode(mode, np.shape(w)[-1])
    codes, stored = _codes(w, mode, dtype)
    return pack(codes, BITS[mode]), stored


def _values(codes: np.ndarray, mode: str) -> np.ndarray:
    return (E4M3_VALUES if BITS[mode] == 8 else FP4_VALUES)[codes]


def scale_values(scales: np.ndarray, mode: str) -> np.ndarray:
    """Stored uint8 scales -> float32 values (e8m0: 2**(s - 127); e4m3 for nvfp4)."""
    scales = np.asarray(scales, dtype=np.uint8)
    if mode == "nvfp4":
        return E4M3_VALUES[scales]
    return np.ldexp(np.float32(1), scales.astype(np.int32) - 127).astype(np.float32)


def dequantize(packed: np.ndarray, scales: np.ndarray, mode: str) -> np.ndarray:
    """value(code) * scale per group, float32 (exact: both factors have short mantissas)."""
    check_mode(mode)
    bits, size = BITS[mode], GROUP_SIZE[mode]
    in_dim = np.shape(packed)[-1] * 32 // bits
    codes = unpack(packed, bits, in_dim)
    vals = _values(codes, mode).reshape(*codes.shape[:-1], in_dim // size, size)
    return (vals * scale_values(scales, mode)[..., None]).reshape(codes.shape)


def quantize_dequantize(w: np.ndarray, mode: str, dtype: str = "float32") -> np.ndarray:
    """w_hat = dequantize(quantize(w)) in float32, without packing."""
    check_mode(mode, np.shape(w)[-1])
    codes, stored = _codes(w, mode, dtype)
    vals = _values(codes, mode).reshape(*stored.shape, GROUP_SIZE[mode])
    with np.errstate(invalid="ignore"):
        return (vals * scale_values(stored, mode)[..., None]).reshape(np.shape(w))


def error(w: np.ndarray, mode: str, dtype: str = "float32") -> np.ndarray:
    """The candidate's error w_hat - w (float32), as the allocator measures it."""
    w = np.asarray(w, dtype=np.float32)
    return quantize_dequantize(w, mode, dtype) - w


def rel_rms_error(w: np.ndarray, mode: str, dtype: str = "float32") -> float:
    """||w_hat - w||_F / ||w||_F (0 for w == 0)."""
    w = np.asarray(w, dtype=np.float32)
    err = error(w, mode, dtype).ravel().astype(np.float64)
    ref = w.ravel().astype(np.float64)
    denom = float(np.dot(ref, ref))
    return math.sqrt(float(np.dot(err, err)) / denom) if denom else 0.0

"""A numpy model of MLX's affine quantization (``mx.quantize(..., mode="affine")``).

It reproduces MLX bit for bit (codes, scales, biases, packed words, dequantized
values; checked against ``mx.quantize``/``mx.dequantize`` in tests/test_affine.py),
so that the analyzer can measure quantization error in fast numpy without MLX.

MLX's algorithm, per group of ``group_size`` consecutive elements of a row:

    n_bins = 2**bits - 1
    scale  = max((w_max - w_min) / n_bins, 1e-7)        (float32)
    the edge is the endpoint with the larger magnitude: w_min if |w_min| > |w_max|
    (scale > 0), else w_max (scale < 0, so codes still count up from the edge)
    q0 = rint(edge / scale)
    if q0 != 0: scale = edge / q0; bias = edge          (so 0.0 is exactly representable)
    else:       bias = 0
    code = clip(rint((w - bias) / scale), 0, n_bins)
    w_hat = scale * code + bias

Codes are computed with the float32 scale and bias; the stored scale and bias
are then rounded to the weight's dtype (bf16 for a bf16 checkpoint), and
dequantization uses the rounded values. ``rint`` is round-half-to-even in both
MLX (std::rint) and numpy.

Packing: each row's codes form one little-endian bit stream, code k at bits
[k*bits, (k+1)*bits); the bytes are read as uint32 words, so a row of ``in``
codes packs into ``in * bits // 32`` words (for 3, 5 and 6 bits too).

API (all vectorised; leading dimensions, e.g. stacked experts, are allowed):
    quantize(w, bits, group_size, scale_dtype="float32") -> (codes u8, scales f32, biases f32)
    dequantize(codes, scales, biases, group_size, out_dtype="float32") -> float32 array
    quantize_dequantize(w, bits, group_size, scale_dtype="float32") -> float32 w_hat
    pack(codes, bits) -> uint32 (..., in*bits//32);  unpack(packed, bits, in_dim) -> codes u8
    rel_rms_error(w, bits, group_size, scale_dtype="float32") -> ||w_hat - w|| / ||w||
    bits_per_weight(bits, group_size) -> bits + 32/group_size (16-bit scale and bias)
    round_to_dtype(x, "float32"|"bfloat16"|"float16") -> float32 values representable there
"""

from __future__ import annotations

import math

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = ("float32", "bfloat16", "float16")
_EPS = np.float32(1e-7)


def bits_per_weight(bits: int, group_size: int) -> float:
    """Storage cost per weight with a 16-bit scale and a 16-bit bias per group."""
    return bits + 32.0 / group_size


def check_setting(bits: int, group_size: int, in_dim: int | None = None) -> None:
    """Raise ValueError unless MLX can quantize with (bits, group_size) [and this width]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if in_dim is not None and in_dim % group_size:
        raise ValueError(f"last dimension {in_dim} is not divisible by group_size {group_size}")


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 values to the nearest `dtype` value (ties to even), as float32."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        # Round-to-nearest-even on the upper 16 bits (finite inputs only; weights are finite).
        u = x.view(np.uint32)
        lsb = (u >> np.uint32(16)) & np.uint32(1)
        rounded = (u + np.uint32(0x7FFF) + lsb) & np.uint32(0xFFFF0000)
        return rounded.view(np.float32)
    raise ValueError(f"scale dtype must be one of {SCALE_DTYPES}, got {dtype!r}")


def _groups(w: np.ndarray, group_size: int) -> np.ndarray:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim < 2:
        raise ValueError(f"quantize needs a 2-D (or stacked) array, got shape {w.shape}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def _scale_bias(g: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MLX's float32 per-group scale and bias for grouped weights g (..., n_groups, group)."""
    n_bins = np.float32((1 << bits) - 1)
    w_max = g.max(axis=-1)
    w_min = g.min(axis=-1)
    from_min = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, _EPS)
    scale = np.where(from_min, scale, -scale)
    edge = np.where(from_min, w_min, w_max)
    q0 = np.rint(edge / scale)
    nonzero = q0 != 0
    scale = np.where(nonzero, edge / np.where(nonzero, q0, np.float32(1)), scale)
    bias = np.where(nonzero, edge, np.float32(0))
    return scale.astype(np.float32), bias.astype(np.float32)


def _codes(g: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int) -> np.ndarray:
    """Float32 codes in [0, 2**bits - 1] (still float, to save a cast on the error path)."""
    n_bins = np.float32((1 << bits) - 1)
    q = g - bias[..., None]
    q /= scale[..., None]
    np.rint(q, out=q)
    np.clip(q, np.float32(0), n_bins, out=q)
    return q


def quantize(
    w: np.ndarray, bits: int, group_size: int, scale_dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (uint8, same shape as w), scales and biases (float32, (..., in // group_size)).

    Scales and biases are rounded to `scale_dtype` (the dtype MLX would store them in:
    the weight's own dtype), after the codes were computed with the float32 values.
    """
    check_setting(bits, group_size, np.shape(w)[-1])
    g = _groups(w, group_size)
    scale, bias = _scale_bias(g, bits)
    codes = _codes(g, scale, bias, bits).astype(np.uint8).reshape(np.shape(w))
    return codes, round_to_dtype(scale, scale_dtype), round_to_dtype(bias, scale_dtype)


def dequantize(
    codes: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    group_size: int,
    out_dtype: str = "float32",
) -> np.ndarray:
    """scale * code + bias per group, float32. With out_dtype bf16/f16 each step is
    rounded as MLX's bf16/f16 arithmetic does (product, then sum)."""
    shape = codes.shape
    q = codes.reshape(*shape[:-1], shape[-1] // group_size, group_size).astype(np.float32)
    out = round_to_dtype(q * scales[..., None], out_dtype)
    out = round_to_dtype(out + biases[..., None], out_dtype)
    return out.reshape(shape)


def quantize_dequantize(
    w: np.ndarray, bits: int, group_size: int, scale_dtype: str = "float32"
) -> np.ndarray:
    """w_hat = dequantize(quantize(w)) in float32, without materialising uint8 codes."""
    check_setting(bits, group_size, np.shape(w)[-1])
    g = _groups(w, group_size)
    scale, bias = _scale_bias(g, bits)
    q = _codes(g, scale, bias, bits)
    q *= round_to_dtype(scale, scale_dtype)[..., None]
    q += round_to_dtype(bias, scale_dtype)[..., None]
    return q.reshape(np.shape(w))


def rel_rms_error(w: np.ndarray, bits: int, group_size: int, scale_dtype: str = "float32") -> float:
    """Relative RMS error ||w_hat - w||_F / ||w||_F of quantize-dequantize (0 for w == 0)."""
    w = np.asarray(w, dtype=np.float32)
    err = quantize_dequantize(w, bits, group_size, scale_dtype) - w
    denom = float(np.dot(w.ravel().astype(np.float64), w.ravel().astype(np.float64)))
    if denom == 0.0:
        return 0.0
    num = float(np.dot(err.ravel().astype(np.float64), err.ravel().astype(np.float64)))
    return math.sqrt(num / denom)


def _chunk_layout(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk): the smallest run of codes filling whole bytes."""
    chunk_bits = math.lcm(bits, 8)
    return chunk_bits // bits, chunk_bits // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes (..., in) into MLX's uint32 words (..., in * bits // 32)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    codes = np.asarray(codes)
    in_dim = codes.shape[-1]
    if (in_dim * bits) % 32:
        raise ValueError(f"a row of {in_dim} {bits}-bit codes does not fill whole uint32 words")
    per_chunk, bytes_per_chunk = _chunk_layout(bits)
    rows = codes.reshape(-1, in_dim)
    out = np.empty((rows.shape[0], in_dim * bits // 8), dtype=np.uint8)
    shifts = np.arange(per_chunk, dtype=np.uint64) * np.uint64(bits)
    byte_shifts = np.arange(bytes_per_chunk, dtype=np.uint64) * np.uint64(8)
    step = max(1, (1 << 20) // in_dim)  # bound the uint64 temporaries to ~8 MB
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].astype(np.uint64)
        block = block.reshape(block.shape[0], -1, per_chunk)
        words = np.bitwise_or.reduce(block << shifts, axis=-1)
        chunk_bytes = (words[..., None] >> byte_shifts) & np.uint64(0xFF)
        out[start : start + step] = chunk_bytes.reshape(block.shape[0], -1)
    return out.view("<u4").reshape(*codes.shape[:-1], in_dim * bits // 32)


def unpack(packed: np.ndarray, bits: int, in_dim: int) -> np.ndarray:
    """Inverse of `pack`: uint32 words (..., in * bits // 32) -> uint8 codes (..., in)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    packed = np.ascontiguousarray(packed, dtype="<u4")
    if packed.shape[-1] * 32 != in_dim * bits:
        raise ValueError(f"{packed.shape[-1]} words do not hold {in_dim} {bits}-bit codes")
    per_chunk, bytes_per_chunk = _chunk_layout(bits)
    raw = packed.reshape(-1, packed.shape[-1]).view(np.uint8)
    raw = raw.reshape(raw.shape[0], -1, bytes_per_chunk).astype(np.uint64)
    byte_shifts = np.arange(bytes_per_chunk, dtype=np.uint64) * np.uint64(8)
    words = np.bitwise_or.reduce(raw << byte_shifts, axis=-1)
    shifts = np.arange(per_chunk, dtype=np.uint64) * np.uint64(bits)
    codes = (words[..., None] >> shifts) & np.uint64((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(*packed.shape[:-1], in_dim)

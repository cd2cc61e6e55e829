"""GGML tensor types: block geometry and numpy dequantizers.

A GGML quantized row is a run of blocks; each block holds `block_size` weights in
`type_size` bytes. Dequantizers take a uint8 array [..., type_size] (one block per
last-axis row) and return float32 [..., block_size], computing in float32 in the
order llama.cpp's reference dequantizers do, so the values match bit for bit
(tests cross-check each one against the `gguf` package's own numpy code).

Layouts (ggml-common.h): Q8_0 {f16 d; i8 q[32]}; Q4_0 {f16 d; u8 q[16]} (low
nibbles are weights 0..15, high 16..31, value d*(q-8)); Q4_1 {f16 d, m; u8 q[16]}
(d*q+m); Q5_0/Q5_1 add u32 high bits; K-quants are 256-weight super-blocks of
sub-blocks with 6-bit (Q4_K, Q5_K: 8 of 32) or 8-bit (Q6_K: 16 of 16) scales.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int
    block_size: int  # weights per block
    type_size: int  # bytes per block
    dequantize: Callable[[np.ndarray], np.ndarray] | None  # None: plain float, see below
    float_dtype: type | None = None  # numpy dtype of unquantized types (bf16 as uint16)

    @property
    def quantized(self) -> bool:
        return self.dequantize is not None

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_size


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The f16 at byte `start` of every block, as float32 [..., 1]."""
    raw = np.ascontiguousarray(blocks[..., start : start + 2])
    return raw.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """u8 [..., n] -> u8 [..., 2n]: all low nibbles, then all high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Little-endian bit `i` of the packed bytes for i < count, as u8 [..., count]."""
    return np.unpackbits(packed, axis=-1, bitorder="little")[..., :count]


def dequantize_q8_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b, 0)
    q = np.ascontiguousarray(b[..., 2:34]).view(np.int8).astype(np.float32)
    return d * q


def dequantize_q4_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b, 0)
    q = _nibbles(b[..., 2:18]).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def dequantize_q4_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b, 0), _f16(b, 2)
    return d * _nibbles(b[..., 4:20]).astype(np.float32) + m


def dequantize_q5_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b, 0)
    q = _nibbles(b[..., 6:22]) | (_bits(b[..., 2:6], 32) << 4)
    return d * (q.astype(np.float32) - 16)


def dequantize_q5_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[..., 8:24]) | (_bits(b[..., 4:8], 32) << 4)
    return d * q.astype(np.float32) + m


def k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the 12 packed bytes -> 6-bit scales and mins of the 8 sub-blocks."""
    s = scales.astype(np.uint8)
    lo, hi = s[..., 0:4], s[..., 4:8]
    top = s[..., 8:12]
    sc = np.concatenate([lo & 63, (top & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 63, (top >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc, mn


def _k_apply(d, dmin, sc, mn, q: np.ndarray) -> np.ndarray:
    """d*sc*q - dmin*mn per sub-block of 32 (q: [..., 256])."""
    d1 = d * sc.astype(np.float32)  # [..., 8]
    m1 = dmin * mn.astype(np.float32)
    shape = q.shape[:-1]
    q = q.reshape(*shape, 8, 32).astype(np.float32)
    return (d1[..., None] * q - m1[..., None]).reshape(*shape, QK_K)


def _k4_quants(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 nibbles: per 64 weights, 32 low nibbles then 32 high ones."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)
    return np.stack([chunks & 0x0F, chunks >> 4], axis=-2).reshape(*qs.shape[:-1], QK_K)


def dequantize_q4_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = k_scales_mins(b[..., 4:16])
    return _k_apply(d, dmin, sc, mn, _k4_quants(b[..., 16:144]))


def dequantize_q5_k(b: np.ndarray) -> np.ndarray:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = k_scales_mins(b[..., 4:16])
    qh = b[..., 16:48]  # bit j of byte l: high bit of weight 32*j + l
    high = np.stack([(qh >> j) & 1 for j in range(8)], axis=-2).reshape(*qh.shape[:-1], QK_K)
    return _k_apply(d, dmin, sc, mn, _k4_quants(b[..., 48:176]) | (high << 4))


def dequantize_q6_k(b: np.ndarray) -> np.ndarray:
    ql, qh = b[..., 0:128], b[..., 128:192]
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b, 208)
    lead = b.shape[:-1]
    ql = ql.reshape(*lead, 2, 2, 32)  # [half, low/high 32 bytes, l]
    qh = qh.reshape(*lead, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-2)  # [half, 4, 32]: weights l+32k
    high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-2)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    q = q.reshape(*lead, 16, 16).astype(np.float32)  # 16 sub-blocks of 16
    return ((d * sc)[..., None] * q).reshape(*lead, QK_K)


TYPES: dict[int, GGMLType] = {
    t.id: t
    for t in (
        GGMLType("F32", 0, 1, 4, None, np.float32),
        GGMLType("F16", 1, 1, 2, None, np.float16),
        GGMLType("BF16", 30, 1, 2, None, np.uint16),
        GGMLType("Q4_0", 2, 32, 18, dequantize_q4_0),
        GGMLType("Q4_1", 3, 32, 20, dequantize_q4_1),
        GGMLType("Q5_0", 6, 32, 22, dequantize_q5_0),
        GGMLType("Q5_1", 7, 32, 24, dequantize_q5_1),
        GGMLType("Q8_0", 8, 32, 34, dequantize_q8_0),
        GGMLType("Q4_K", 12, QK_K, 144, dequantize_q4_k),
        GGMLType("Q5_K", 13, QK_K, 176, dequantize_q5_k),
        GGMLType("Q6_K", 14, QK_K, 210, dequantize_q6_k),
    )
}
BY_NAME = {t.name: t for t in TYPES.values()}


def rows_to_float32(raw: np.ndarray, ggml_type: GGMLType, cols: int) -> np.ndarray:
    """Stored rows (uint8 [rows, row_bytes], or the float dtype itself) -> float32 [rows, cols]."""
    if not ggml_type.quantized:
        if ggml_type.name == "BF16":
            out = raw.astype(np.uint32)
            out <<= np.uint32(16)
            return out.view(np.float32)
        return raw.astype(np.float32)
    n_rows = raw.shape[0]
    blocks = raw.reshape(n_rows, cols // ggml_type.block_size, ggml_type.type_size)
    return ggml_type.dequantize(blocks).reshape(n_rows, cols)

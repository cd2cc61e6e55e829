"""`--recipe keep`: carry a GGUF's own quantization grid over into MLX's affine format.

MLX stores w = scale * code + bias per group of `group_size` weights. Where a GGML
block type is exactly such a grid on groups of 32, its codes, scales and biases
are copied (no re-quantization, the same dequantized values bit for bit):

    Q8_0  d*q, q in [-128, 127]  -> 8-bit g32, code q+128, scale d, bias -128d
    Q4_0  d*(q-8)                -> 4-bit g32, scale d, bias -8d
    Q4_1  d*q + m                -> 4-bit g32, scale d, bias m
    Q5_0 / Q5_1                  -> 5-bit g32 likewise (bias -16d / m)
    Q4_K / Q5_K  sub-blocks of 32 with their own scale d*sc and min dmin*m
                                 -> 4/5-bit g32, scale d*sc, bias -dmin*m

Legacy scales are float16 values and are stored as float16; K-quant scales
(d*sc: 17 significant bits) need float32, so their modules store float32 scales
and biases (2 bits per weight of overhead instead of 1). Q6_K has 16-wide
sub-blocks with separate scales, which no 32-wide affine group represents: it is
re-quantized at 8-bit g32 (the nearest faithful setting). Float tensors (F32,
F16, BF16) stay float. Every module's choice and its reason is in the plan.
"""

from __future__ import annotations

import numpy as np

from ..mlx_names import MlxTensor, NameMap
from ..plan import Decision, Plan
from .gguf_quants import QK_K, GGMLType, k_scales_mins
from .gguf_source import GGUFCheckpoint, View

RECIPE = "keep"
GROUP = 32
EXACT_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5}
FLOAT_SCALES = {"Q4_K", "Q5_K"}  # their scales need float32
NEAREST = {"Q6_K": 8}
EXACT_REASON = "keep: exact"


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(b[..., at : at + 2]).view(np.float16).astype(np.float32)[..., 0]


def _legacy(name: str, b: np.ndarray):
    """(codes [..., 32], scale [...], bias [...]) of legacy blocks (one group each)."""
    from .gguf_quants import _bits, _nibbles

    d = _f16(b, 0)
    if name == "Q8_0":
        q = np.ascontiguousarray(b[..., 2:34]).view(np.int8).astype(np.int16) + 128
        return q.astype(np.uint8), d, d * np.float32(-128)
    if name == "Q4_0":
        return _nibbles(b[..., 2:18]), d, d * np.float32(-8)
    if name == "Q4_1":
        return _nibbles(b[..., 4:20]), d, _f16(b, 2)
    if name == "Q5_0":
        return _nibbles(b[..., 6:22]) | (_bits(b[..., 2:6], 32) << 4), d, d * np.float32(-16)
    if name == "Q5_1":
        return _nibbles(b[..., 8:24]) | (_bits(b[..., 4:8], 32) << 4), d, _f16(b, 2)
    raise ValueError(name)


def _k_quant(name: str, b: np.ndarray):
    """(codes [..., 8, 32], scales [..., 8], biases [..., 8]) of Q4_K/Q5_K super-blocks."""
    from .gguf_quants import _k4_quants

    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    sc, mn = k_scales_mins(b[..., 4:16])
    if name == "Q4_K":
        q = _k4_quants(b[..., 16:144])
    else:
        qh = b[..., 16:48]
        high = np.stack([(qh >> j) & 1 for j in range(8)], axis=-2).reshape(*qh.shape[:-1], QK_K)
        q = _k4_quants(b[..., 48:176]) | (high << 4)
    scales = d * sc.astype(np.float32)
    biases = -(dmin * mn.astype(np.float32))
    return q.reshape(*q.shape[:-1], 8, 32), scales, biases


def block_groups(gtype: GGMLType, raw: np.ndarray, cols: int):
    """Raw rows (uint8 [r, row_bytes]) -> codes uint8 [r, cols], scales and biases
    float32 [r, cols / 32]: the block's own grid as MLX affine groups of 32."""
    r = raw.shape[0]
    blocks = raw.reshape(r, cols // gtype.block_size, gtype.type_size)
    if gtype.name in FLOAT_SCALES:
        codes, scales, biases = _k_quant(gtype.name, blocks)
    else:
        codes, scales, biases = _legacy(gtype.name, blocks)
    return (codes.reshape(r, cols).astype(np.uint8), scales.reshape(r, -1).astype(np.float32),
            biases.reshape(r, -1).astype(np.float32))


def _group_perm(col_perm: np.ndarray | None) -> np.ndarray | None | bool:
    """The permutation of 32-groups a column permutation makes; False if it splits groups."""
    if col_perm is None:
        return None
    runs = col_perm.reshape(-1, GROUP)
    starts = runs[:, 0]
    if np.any(starts % GROUP) or np.any(runs != starts[:, None] + np.arange(GROUP)):
        return False
    return starts // GROUP


def _views(ckpt: GGUFCheckpoint, t: MlxTensor) -> list[View]:
    return [ckpt.views[p.hf_name] for slot in t.slots for p in slot]


def _source_types(ckpt: GGUFCheckpoint, t: MlxTensor) -> set[str]:
    return {s.tensor.type.name for v in _views(ckpt, t) for s in v.segments}


def keep_decision(ckpt: GGUFCheckpoint, t: MlxTensor) -> Decision:
    params, in_dim = int(np.prod(t.shape)), t.shape[-1]
    base = dict(module=t.module, params=params, in_dim=in_dim)
    types = _source_types(ckpt, t)
    label = "+".join(sorted(types))
    if types <= {"F32", "F16", "BF16"}:
        return Decision(**base, reason=f"keep: {label} stays float")
    if len(types) == 1 and label in EXACT_BITS and in_dim % GROUP == 0:
        if all(_group_perm(v.col_perm) is not False for v in _views(ckpt, t)):
            return Decision(**base, bits=EXACT_BITS[label], group_size=GROUP,
                            reason=f"{EXACT_REASON}: {label} grid copied")
    bits = NEAREST.get(label, 8)
    why = ("16-wide sub-blocks have no exact 32-wide affine grid" if label == "Q6_K"
           else "no exact MLX affine grid")
    if in_dim % GROUP:
        return Decision(**base, reason=f"keep: {label}, input {in_dim} not a multiple of 32")
    return Decision(**base, bits=bits, group_size=GROUP,
                    reason=f"keep: {label} re-quantized at {bits}-bit g32 ({why})")


def keep_plan(ckpt: GGUFCheckpoint, name_map: NameMap) -> Plan:
    decisions = {t.module: keep_decision(ckpt, t) for t in name_map.quantizable()}
    return Plan(recipe=RECIPE, decisions=decisions,
                float_params=sum(int(np.prod(t.shape)) for t in name_map.floats()),
                dropped=list(name_map.dropped))


def kept_scale_dtype(ckpt, t: MlxTensor, decision: Decision) -> str | None:
    """The dtype an exactly kept module's scales and biases need; None otherwise."""
    if not isinstance(ckpt, GGUFCheckpoint) or not decision.reason.startswith(EXACT_REASON):
        return None
    return "float32" if _source_types(ckpt, t) & FLOAT_SCALES else "float16"


def exact_groups(ckpt, t: MlxTensor, slot: int, r0: int, r1: int, decision: Decision):
    """(codes, scales, biases, scale dtype) of rows [r0, r1) of a kept module's slot,
    copied from the GGUF blocks; None when the module is not kept exactly."""
    dtype = kept_scale_dtype(ckpt, t, decision)
    if dtype is None:
        return None
    parts, offset = [], 0
    for piece in t.slots[slot]:
        lo, hi = max(r0, offset), min(r1, offset + piece.rows)
        if lo < hi:
            rows = np.arange(piece.start + lo - offset, piece.start + hi - offset)
            parts.append(_view_groups(ckpt, ckpt.views[piece.hf_name], piece.expert, rows))
        offset += piece.rows
    codes, scales, biases = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return codes, scales, biases, dtype


def _view_groups(ckpt: GGUFCheckpoint, view: View, expert: int | None, rows: np.ndarray):
    src = view.row_perm[rows] if view.row_perm is not None else rows
    out: list = [None, None, None]
    base = 0
    for seg in view.segments:
        mask = (src >= base) & (src < base + seg.rows)
        if mask.any():
            first = seg.start + (expert or 0) * view.slot_rows
            tensor = seg.tensor
            raw = np.memmap(tensor.file, dtype=np.uint8, mode="r", offset=tensor.offset,
                            shape=(tensor.rows, tensor.type.row_bytes(tensor.cols)))
            got = block_groups(tensor.type, np.asarray(raw[src[mask] - base + first]),
                               tensor.cols)
            for i, part in enumerate(got):
                if out[i] is None:
                    out[i] = np.empty((len(src), part.shape[1]), dtype=part.dtype)
                out[i][mask] = part
        base += seg.rows
    perm = _group_perm(view.col_perm)
    codes, scales, biases = out
    if perm is not None:
        codes, scales, biases = codes[:, view.col_perm], scales[:, perm], biases[:, perm]
    return codes, scales, biases

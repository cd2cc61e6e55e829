"""Tensor classification: a Hugging Face tensor name (and shape) -> class and quantizability.

Only classification lives here; mapping HF names to MLX module paths is mlx_names.py.

Classes (TensorClass values): attention_q, attention_k, attention_v, attention_o,
mlp_gate, mlp_up, mlp_down, expert, shared_expert, router, embedding, lm_head,
norm, linear_attention, conv, other.

Quantizable means MLX could store it affine-quantized: a 2-D weight, or a stacked
expert weight [E, out, in], whose input width is a multiple of the smallest group
(32). Never quantized: 1-D tensors (norms, biases, A_log, dt_bias), conv kernels,
norms of any shape. `expert_index` / `stack_group` identify one-tensor-per-expert
checkpoints (Qwen3-MoE), whose experts mlx_lm stacks into one SwitchLinear, so
the allocator must give the whole group one decision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

MIN_GROUP_SIZE = 32


class TensorClass(StrEnum):
    ATTENTION_Q = "attention_q"
    ATTENTION_K = "attention_k"
    ATTENTION_V = "attention_v"
    ATTENTION_O = "attention_o"
    MLP_GATE = "mlp_gate"
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    EXPERT = "expert"
    SHARED_EXPERT = "shared_expert"
    ROUTER = "router"
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    NORM = "norm"
    LINEAR_ATTENTION = "linear_attention"
    CONV = "conv"
    OTHER = "other"


@dataclass(frozen=True)
class Classification:
    tensor_class: TensorClass
    quantizable: bool
    reason: str | None = None  # why not quantizable
    role: str | None = None  # the projection: q_proj, gate_proj, gate_up_proj, in_proj_qkv, ...
    stacked_experts: bool = False  # one [E, out, in] tensor holding every expert
    expert_index: int | None = None  # the expert of a one-tensor-per-expert checkpoint
    stack_group: str | None = None  # the name with the expert index replaced by "*"


_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_ATTENTION = {
    "q_proj": TensorClass.ATTENTION_Q,
    "k_proj": TensorClass.ATTENTION_K,
    "v_proj": TensorClass.ATTENTION_V,
    "o_proj": TensorClass.ATTENTION_O,
}
_MLP = {
    "gate_proj": TensorClass.MLP_GATE,
    "up_proj": TensorClass.MLP_UP,
    "down_proj": TensorClass.MLP_DOWN,
}
_NEVER_QUANTIZED_LEAVES = {"A_log", "dt_bias", "D", "bias"}


def _parts(name: str) -> tuple[list[str], str, str | None]:
    """Name parts, the leaf (weight/bias/...), and the module that owns it."""
    parts = name.split(".")
    leaf = parts[-1]
    module = parts[-2] if len(parts) > 1 else None
    return parts, leaf, module


def _class_of(name: str, parts: list[str], leaf: str, module: str | None) -> TensorClass:
    if "norm" in (module or "").lower() or "norm" in leaf.lower() or "layernorm" in name:
        return TensorClass.NORM
    if leaf in ("embed_tokens", "wte", "tok_embeddings") or module in (
        "embed_tokens",
        "wte",
        "tok_embeddings",
    ):
        return TensorClass.EMBEDDING
    if module == "lm_head" or leaf == "lm_head":
        return TensorClass.LM_HEAD
    if "conv1d" in parts or module == "conv1d":
        return TensorClass.CONV
    if "experts" in parts:
        return TensorClass.EXPERT
    if "shared_expert_gate" in parts:
        return TensorClass.ROUTER
    if "shared_expert" in parts or "shared_experts" in parts:
        return TensorClass.SHARED_EXPERT
    if "linear_attn" in parts:
        return TensorClass.LINEAR_ATTENTION
    if module in _ATTENTION and ("self_attn" in parts or "attn" in parts or "attention" in parts):
        return _ATTENTION[module]
    if module in _MLP:
        return _MLP[module]
    if module == "gate" and "mlp" in parts:
        return TensorClass.ROUTER
    return TensorClass.OTHER


def classify(name: str, shape: tuple[int, ...]) -> Classification:
    parts, leaf, module = _parts(name)
    tensor_class = _class_of(name, parts, leaf, module)
    role = module if leaf in ("weight", "bias") else leaf
    match = _EXPERT.search(name)
    expert_index = int(match.group(1)) if match else None
    stack_group = _EXPERT.sub(".experts.*.", name) if match else None
    stacked = tensor_class == TensorClass.EXPERT and expert_index is None and len(shape) == 3

    def keep(reason: str) -> Classification:
        return Classification(tensor_class, False, reason, role, stacked, expert_index, stack_group)

    if tensor_class in (TensorClass.NORM, TensorClass.CONV):
        return keep(f"{tensor_class.value} tensors stay in float")
    if leaf in _NEVER_QUANTIZED_LEAVES:
        return keep(f"{leaf} parameters stay in float")
    if len(shape) == 1:
        return keep("1-D tensors stay in float")
    if len(shape) == 3 and not stacked:
        return keep(f"{len(shape)}-D tensor that is not a stacked expert weight")
    if len(shape) not in (2, 3):
        return keep(f"{len(shape)}-D tensor")
    if shape[-1] % MIN_GROUP_SIZE:
        return keep(f"input width {shape[-1]} is not a multiple of {MIN_GROUP_SIZE}")
    return Classification(tensor_class, True, None, role, stacked, expert_index, stack_group)

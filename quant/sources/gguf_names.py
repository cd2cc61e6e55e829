"""GGUF tensor names <-> Hugging Face tensor names, one table per architecture.

llama.cpp's converter renames every tensor (`model.layers.3.mlp.down_proj.weight`
-> `blk.3.ffn_down.weight`) and stacks per-expert tensors into one `*_exps`
tensor. This module is the single place that knows those names; the GGUF reader,
recipes and the imatrix reader all map through it.

    to_hf(arch, "blk.3.ffn_down.weight")                -> ["model.layers.3.mlp.down_proj.weight"]
    to_hf("qwen3moe", "blk.3.ffn_down_exps.weight", 4)  -> [...experts.0.down_proj.weight, ... 3]
    to_gguf(arch, "model.layers.3.mlp.down_proj.weight") -> "blk.3.ffn_down.weight"
    hf_model_type(arch) -> the config.json model_type mlx_lm loads it as

Only names live here: the value transforms llama.cpp applies on the way (the
rotary Q/K row permutation for llama, the Qwen3.5 value-head reorder, -exp(A_log),
+1 on norms) are undone by the GGUF source (gguf_source.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# GGUF general.architecture -> the config.json model_type of the Hugging Face model.
MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "qwen35": "qwen3_5",
    "qwen35moe": "qwen3_5_moe",
}
SUPPORTED = tuple(MODEL_TYPES)

_HYBRID = {"qwen35", "qwen35moe"}  # Qwen3.5: text model under model.language_model


class UnknownTensorName(KeyError):
    """A GGUF or HF tensor name that the architecture's table does not know."""


class UnsupportedArchitecture(ValueError):
    def __init__(self, arch: str):
        super().__init__(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )


@dataclass(frozen=True)
class Mapping:
    """One GGUF tensor's Hugging Face counterpart.

    hf: the HF name; for `per_expert` it holds "{e}" where the expert index goes.
    part: "all" (the whole HF tensor), "first_half" / "second_half" (the GGUF
    tensor is half of the rows of a stacked HF tensor: Qwen3.5's gate_up_proj).
    per_expert: the GGUF tensor stacks [E, out, in]; HF stores one tensor per expert.
    """

    hf: str
    part: str = "all"
    per_expert: bool = False


# Block tensors: GGUF base name -> HF module path under the layer, shared by all archs.
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    # Qwen3.5 gated delta net (linear attention)
    "attn_qkv": "linear_attn.in_proj_qkv",
    "attn_gate": "linear_attn.in_proj_z",
    "ssm_beta": "linear_attn.in_proj_b",
    "ssm_alpha": "linear_attn.in_proj_a",
    "ssm_conv1d": "linear_attn.conv1d",
    "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
}
# Tensors whose HF name has no .weight/.bias leaf of the GGUF one.
_BLOCK_EXACT = {
    "ssm_a": "linear_attn.A_log",  # stored as -exp(A_log)
    "ssm_dt.bias": "linear_attn.dt_bias",
}
_GLOBAL = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
}
_PER_EXPERT = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# Qwen3.5 keeps experts stacked in HF too, gate and up fused as gate_up_proj [E, 2I, H].
_STACKED = {
    "ffn_gate_exps": Mapping("mlp.experts.gate_up_proj", "first_half"),
    "ffn_up_exps": Mapping("mlp.experts.gate_up_proj", "second_half"),
    "ffn_gate_up_exps": Mapping("mlp.experts.gate_up_proj"),
    "ffn_down_exps": Mapping("mlp.experts.down_proj"),
}
# Tensors llama.cpp adds that HF does not store (llama 3 rope scaling factors).
DERIVED = ("rope_freqs.weight",)

_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


def _check(arch: str) -> None:
    if arch not in MODEL_TYPES:
        raise UnsupportedArchitecture(arch)


def hf_model_type(arch: str) -> str:
    _check(arch)
    return MODEL_TYPES[arch]


def model_prefix(arch: str) -> str:
    """Where the decoder's tensors live in the HF checkpoint."""
    _check(arch)
    return "model.language_model" if arch in _HYBRID else "model"


def lookup(arch: str, gguf_name: str) -> Mapping | None:
    """The HF counterpart of one GGUF tensor; None for tensors HF does not store."""
    _check(arch)
    prefix = model_prefix(arch)
    if gguf_name in DERIVED:
        return None
    if gguf_name == "output.weight":
        return Mapping("lm_head.weight")
    if gguf_name in _GLOBAL:
        return Mapping(f"{prefix}.{_GLOBAL[gguf_name]}")
    match = _BLOCK_NAME.match(gguf_name)
    if match is None:
        raise UnknownTensorName(gguf_name)
    layer, rest = match.groups()
    base = f"{prefix}.layers.{layer}"
    if rest in _BLOCK_EXACT:
        return Mapping(f"{base}.{_BLOCK_EXACT[rest]}")
    stem, dot, leaf = rest.rpartition(".")
    if not dot or leaf not in ("weight", "bias"):
        raise UnknownTensorName(gguf_name)
    if stem in _PER_EXPERT or stem == "ffn_gate_up_exps":
        if arch in _HYBRID:
            return Mapping(f"{base}.{_STACKED[stem].hf}", _STACKED[stem].part)
        if stem == "ffn_gate_up_exps":
            raise UnknownTensorName(gguf_name)
        return Mapping(f"{base}.mlp.experts.{{e}}.{_PER_EXPERT[stem]}.{leaf}", per_expert=True)
    if stem not in _BLOCK:
        raise UnknownTensorName(gguf_name)
    return Mapping(f"{base}.{_BLOCK[stem]}.{leaf}")


def to_hf(arch: str, gguf_name: str, n_experts: int | None = None) -> list[str]:
    """The HF tensor name(s) a GGUF tensor holds: one, or one per expert for a
    stacked `*_exps` tensor of a model whose HF checkpoint stores experts apart
    (n_experts is then required). [] for tensors HF does not store."""
    mapping = lookup(arch, gguf_name)
    if mapping is None:
        return []
    if not mapping.per_expert:
        return [mapping.hf]
    if n_experts is None:
        raise ValueError(f"{gguf_name} stacks experts: pass n_experts")
    return [mapping.hf.format(e=e) for e in range(n_experts)]


_HF_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def to_gguf(arch: str, hf_name: str) -> str:
    """The GGUF tensor that holds an HF tensor (for a per-expert HF tensor, the
    stacked `*_exps` tensor; Qwen3.5's gate_up_proj lives in two: gate is given)."""
    _check(arch)
    prefix = model_prefix(arch)
    if hf_name == "lm_head.weight":
        return "output.weight"
    for gguf, hf in _GLOBAL.items():
        if hf_name == f"{prefix}.{hf}":
            return gguf
    match = re.match(rf"^{re.escape(prefix)}\.layers\.(\d+)\.(.+)$", hf_name)
    if match is None:
        raise UnknownTensorName(hf_name)
    layer, rest = match.groups()
    for gguf, hf in _BLOCK_EXACT.items():
        if rest == hf:
            return f"blk.{layer}.{gguf}"
    if arch in _HYBRID:
        for gguf, mapping in _STACKED.items():
            if rest == mapping.hf and gguf != "ffn_gate_up_exps" and gguf != "ffn_up_exps":
                return f"blk.{layer}.{gguf}.weight"
    stem, _, leaf = rest.rpartition(".")
    expert = _HF_EXPERT.search(f".{stem}.")
    if expert is not None:
        role = stem.rsplit(".", 1)[-1]
        for gguf, hf_role in _PER_EXPERT.items():
            if role == hf_role:
                return f"blk.{layer}.{gguf}.{leaf}"
        raise UnknownTensorName(hf_name)
    for gguf, hf in _BLOCK.items():
        if stem == hf:
            if gguf == "post_attention_norm" and arch not in _HYBRID:
                continue
            if gguf == "ffn_norm" and arch in _HYBRID:
                continue
            return f"blk.{layer}.{gguf}.{leaf}"
    raise UnknownTensorName(hf_name)

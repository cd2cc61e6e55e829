"""config.json for mlx_lm from a GGUF's metadata (`ARCH.block_count`, ...).

Every value the model needs must be in the metadata: a missing key is an error
naming it, never a silent default. Shapes that the metadata leaves implicit
(the vocabulary, tied embeddings) are read off the tensors themselves.
"""

from __future__ import annotations

from .gguf_file import GGUFError, GGUFModel
from .gguf_names import UnsupportedArchitecture, hf_model_type


class _Meta:
    def __init__(self, model: GGUFModel):
        self.model, self.arch = model, model.arch
        self.name = model.files[0].name

    def get(self, key: str, *, default=None, required: bool = True):
        full = f"{self.arch}.{key}"
        if full in self.model.metadata:
            return self.model.metadata[full]
        if required:
            raise GGUFError(f"{self.name}: metadata key {full} is missing")
        return default


def _attention(m: _Meta) -> dict:
    hidden, heads = int(m.get("embedding_length")), int(m.get("attention.head_count"))
    head_dim = int(m.get("attention.key_length", default=hidden // heads, required=False))
    return {
        "hidden_size": hidden,
        "num_hidden_layers": int(m.get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m.get("attention.head_count_kv")),
        "head_dim": head_dim,
        "rms_norm_eps": float(m.get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(m.get("rope.freq_base")),
        "max_position_embeddings": int(m.get("context_length")),
        "hidden_act": "silu",
    }


def _moe(m: _Meta) -> dict:
    return {
        "num_experts": int(m.get("expert_count")),
        "num_experts_per_tok": int(m.get("expert_used_count")),
        "moe_intermediate_size": int(m.get("expert_feed_forward_length")),
        # llama.cpp's qwen3moe/qwen35moe graphs always renormalise the top-k weights.
        "norm_topk_prob": True,
    }


def _rope_scaling(m: _Meta) -> dict | None:
    kind = m.get("rope.scaling.type", required=False)
    if kind in (None, "none"):
        if "rope_freqs.weight" in m.model.tensors:
            raise GGUFError(f"{m.name}: llama 3 rope scaling (tensor rope_freqs) cannot be "
                            "rebuilt from GGUF metadata; convert the original HF model")
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(m.get("rope.scaling.factor"))}
    raise GGUFError(f"{m.name}: rope scaling {kind!r} is not supported")


def _dense(m: _Meta, model_type: str) -> dict:
    return {
        "model_type": model_type,
        **_attention(m),
        "intermediate_size": int(m.get("feed_forward_length")),
    }


def _qwen35_text(m: _Meta, moe: bool) -> dict:
    attn = _attention(m)
    n_v = int(m.get("ssm.time_step_rank"))
    rope_dims = int(m.get("rope.dimension_count"))
    text = {
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        **attn,
        "attn_output_gate": True,
        "full_attention_interval": int(m.get("full_attention_interval")),
        "linear_conv_kernel_dim": int(m.get("ssm.conv_kernel")),
        "linear_key_head_dim": int(m.get("ssm.state_size")),
        "linear_num_key_heads": int(m.get("ssm.group_count")),
        "linear_num_value_heads": n_v,
        "linear_value_head_dim": int(m.get("ssm.inner_size")) // n_v,
        "partial_rotary_factor": rope_dims / attn["head_dim"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": attn["rope_theta"],
            "partial_rotary_factor": rope_dims / attn["head_dim"],
            "mrope_interleaved": True,
            "mrope_section": list(m.get("rope.dimension_sections", default=[11, 11, 10],
                                        required=False))[:3],
        },
    }
    if moe:
        text.update(_moe(m))
        text["shared_expert_intermediate_size"] = int(
            m.get("expert_shared_feed_forward_length"))
        text["mlp_only_layers"] = []
    else:
        text["intermediate_size"] = int(m.get("feed_forward_length"))
    return text


def build_config(model: GGUFModel) -> dict:
    """The config.json dict mlx_lm needs to build this GGUF's model."""
    m = _Meta(model)
    try:
        model_type = hf_model_type(m.arch)
    except UnsupportedArchitecture as exc:
        raise GGUFError(f"{m.name}: {exc}") from None
    if m.arch in ("qwen35", "qwen35moe"):
        text = _qwen35_text(m, moe=m.arch == "qwen35moe")
        config = {"model_type": model_type, "text_config": text}
        target = text
    else:
        config = _dense(m, model_type)
        target = config
        if m.arch == "qwen3moe":
            config.update(_moe(m), decoder_sparse_step=1, mlp_only_layers=[])
        if m.arch == "llama":
            config["rope_scaling"] = _rope_scaling(m)
            config["attention_bias"] = "blk.0.attn_q.bias" in model.tensors
            config["mlp_bias"] = False
    embed = model.tensor("token_embd.weight")
    target["vocab_size"] = embed.shape[0]
    tied = "output.weight" not in model.tensors
    target["tie_word_embeddings"] = tied
    config["tie_word_embeddings"] = tied
    _token_ids(model, config)
    return config


def _token_ids(model: GGUFModel, config: dict) -> None:
    meta = model.metadata
    for key, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[field] = int(value)

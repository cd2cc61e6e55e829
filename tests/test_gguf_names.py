"""gguf_names: every GGUF tensor name llama.cpp writes maps to the HF name and back."""

import pytest

from swan_serve.quant.sources import gguf_names as gn


@pytest.mark.parametrize(
    ("arch", "gguf", "hf"),
    [
        ("llama", "token_embd.weight", "model.embed_tokens.weight"),
        ("llama", "output.weight", "lm_head.weight"),
        ("llama", "output_norm.weight", "model.norm.weight"),
        ("llama", "blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
        ("llama", "blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
        ("qwen2", "blk.0.attn_k.bias", "model.layers.0.self_attn.k_proj.bias"),
        ("qwen3", "blk.1.attn_q_norm.weight", "model.layers.1.self_attn.q_norm.weight"),
        ("qwen3moe", "blk.2.ffn_gate_inp.weight", "model.layers.2.mlp.gate.weight"),
        ("qwen35moe", "blk.0.ssm_a", "model.language_model.layers.0.linear_attn.A_log"),
        ("qwen35moe", "blk.0.ssm_dt.bias", "model.language_model.layers.0.linear_attn.dt_bias"),
        ("qwen35moe", "blk.0.attn_qkv.weight",
         "model.language_model.layers.0.linear_attn.in_proj_qkv.weight"),
        ("qwen35moe", "blk.0.ssm_alpha.weight",
         "model.language_model.layers.0.linear_attn.in_proj_a.weight"),
        ("qwen35moe", "blk.3.post_attention_norm.weight",
         "model.language_model.layers.3.post_attention_layernorm.weight"),
        ("qwen35moe", "blk.1.ffn_down_exps.weight",
         "model.language_model.layers.1.mlp.experts.down_proj"),
        ("qwen35moe", "blk.1.ffn_gate_inp_shexp.weight",
         "model.language_model.layers.1.mlp.shared_expert_gate.weight"),
    ],
)
def test_names_map_both_ways(arch, gguf, hf):
    assert gn.to_hf(arch, gguf) == [hf]
    assert gn.to_gguf(arch, hf) == gguf


def test_stacked_experts_map_to_one_hf_tensor_per_expert():
    names = gn.to_hf("qwen3moe", "blk.3.ffn_down_exps.weight", n_experts=3)
    assert names == [f"model.layers.3.mlp.experts.{e}.down_proj.weight" for e in range(3)]
    assert gn.to_gguf("qwen3moe", names[2]) == "blk.3.ffn_down_exps.weight"
    with pytest.raises(ValueError, match="n_experts"):
        gn.to_hf("qwen3moe", "blk.3.ffn_down_exps.weight")


def test_qwen35_gate_and_up_experts_are_halves_of_gate_up_proj():
    gate = gn.lookup("qwen35moe", "blk.0.ffn_gate_exps.weight")
    up = gn.lookup("qwen35moe", "blk.0.ffn_up_exps.weight")
    assert gate.hf == up.hf == "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert (gate.part, up.part) == ("first_half", "second_half")


def test_derived_and_unknown_names():
    assert gn.to_hf("llama", "rope_freqs.weight") == []
    with pytest.raises(gn.UnknownTensorName):
        gn.to_hf("llama", "blk.0.mystery.weight")
    with pytest.raises(gn.UnsupportedArchitecture, match="supported: llama, qwen2"):
        gn.to_hf("falcon", "blk.0.attn_q.weight")

"""--recipe keep: a quantized GGUF's own grid copied into MLX affine groups, exactly."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("gguf")

from swan_serve.quant.build import quantize_model  # noqa: E402
from swan_serve.quant.fixtures.gguf_writer import write_gguf  # noqa: E402
from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes, read_slot_rows  # noqa: E402
from swan_serve.quant.sources.checkpoint import open_checkpoint  # noqa: E402
from swan_serve.quant.sources.gguf_model import prepare_source  # noqa: E402

# One GGML type per tensor family, so that one conversion covers them all.
TYPES = {
    r"attn_q\.": "Q4_K", r"attn_k\.": "Q5_K", r"attn_v\.": "Q8_0", r"attn_output": "Q4_0",
    r"ffn_gate\.": "Q4_1", r"ffn_up\.": "Q6_K", r"ffn_down": "Q5_0", r"token_embd": "Q5_1",
    r"^output\.": "BF16",
    # Qwen3.5: experts, linear attention (value-head reorder, out_proj column order)
    r"exps": "Q4_K", r"shexp": "Q8_0", r"attn_qkv|attn_gate|ssm_out": "Q5_K",
    r"ssm_alpha|ssm_beta|ffn_gate_inp": "Q8_0",
}
EXPECTED_BITS = {"Q4_K": 4, "Q5_K": 5, "Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5,
                 "Q5_1": 5, "Q6_K": 8}


@pytest.mark.parametrize(("arch", "overrides"), [
    ("llama", {"hidden_size": 256}),
    ("qwen3_5_moe", {"hidden_size": 256, "moe_intermediate_size": 256,
                     "linear_num_key_heads": 2,
                     "linear_num_value_heads": 8, "linear_value_head_dim": 64}),
])
def test_keep_copies_the_gguf_grid_exactly(arch, overrides, tiny_checkpoint, tmp_path):
    hf = tiny_checkpoint(arch, tokenizer="small", overrides=overrides)
    gguf_path = write_gguf(hf, tmp_path / "m.gguf", qtype="BF16", qtypes=TYPES)
    folder, _ = prepare_source(gguf_path, tmp_path / "src")
    out = tmp_path / "out"
    result = quantize_model(folder, out, recipe="keep", progress=False)  # + verify_generates
    plan = json.loads((out / "swan-plan.json").read_text())
    assert plan["recipe"] == "keep"
    src = open_checkpoint(folder)
    name_map = build_name_map(src.config, checkpoint_shapes(src))
    weights = {}
    for f in out.glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    exact = 0
    for t in name_map.quantizable():
        d = result.plan.decisions[t.module]
        assert d.reason.startswith("keep: "), d.reason
        if not d.quantized:
            assert "BF16 stays float" in d.reason
            continue
        w = mx.dequantize(weights[f"{t.module}.weight"],
                          weights[f"{t.module}.scales"].astype(mx.float32),
                          weights[f"{t.module}.biases"].astype(mx.float32),
                          group_size=d.group_size, bits=d.bits)
        w = np.array(w).reshape(len(t.slots), t.shape[-2], t.shape[-1])
        want = np.stack([read_slot_rows(src, slot, 0, t.shape[-2]) for slot in t.slots])
        source_type = d.reason.split(": ")[-1].split()[0]
        assert d.bits == EXPECTED_BITS[source_type] and d.group_size == 32, d.reason
        if d.reason.startswith("keep: exact"):
            # Equal values (only the sign of a zero may differ: d*(q-8) vs d*q - 8d).
            np.testing.assert_array_equal(w, want, err_msg=t.module)
            exact += 1
        else:  # Q6_K: re-quantized at 8 bits
            assert "Q6_K" in d.reason
            rel = np.linalg.norm(w - want) / np.linalg.norm(want)
            assert rel < 0.01, (t.module, rel)
    assert exact >= 5


def test_swan_serve_build_with_keep_goes_to_the_cache(tiny_checkpoint, tmp_path):
    from swan_serve.quant.build import BuildOptions, resolve_or_build

    hf = tiny_checkpoint("qwen3", tokenizer="small")
    gguf_path = write_gguf(hf, tmp_path / "m.gguf", qtype="Q8_0")
    options = BuildOptions(recipe="keep", cache_dir=tmp_path / "cache")
    served = resolve_or_build(str(gguf_path), options, log=lambda _: None)
    plan = json.loads((served / "swan-plan.json").read_text())
    assert plan["recipe"] == "keep" and plan["settings"] == {"8b/g32": plan["total_params"]
                                                             - plan["float_params"]}
    again = resolve_or_build(str(gguf_path), options, log=lambda _: None)
    assert again == served
    budget = resolve_or_build(str(gguf_path), BuildOptions(cache_dir=tmp_path / "cache"),
                              log=lambda _: None)
    assert budget != served  # the recipe is part of the cache key

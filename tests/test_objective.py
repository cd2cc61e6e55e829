"""The output objective (issue 18): numpy forward, input moments, weighted fit,
class calibration, and the budget plan built on them, on real tiny checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from swan_serve import DEMO_MODEL_DIR
from swan_serve.quant import affine, fit
from swan_serve.quant.allocate import build_plan
from swan_serve.quant.analyze import analyze_checkpoint
from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes
from swan_serve.quant.moments import MomentOptions
from swan_serve.quant.npmodel import NpModel
from swan_serve.quant.objective import measure
from swan_serve.quant.recipe import load_recipe
from swan_serve.quant.sensitivity import Sensitivity
from swan_serve.quant.sources.checkpoint import open_checkpoint

QUICK = MomentOptions(max_new_tokens=8)


def test_numpy_forward_matches_mlx_lm_with_and_without_cache():
    from mlx_lm import load

    model, tokenizer = load(str(DEMO_MODEL_DIR))
    model.set_dtype(mx.float32)
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    npm = NpModel.from_mlx(model, config)
    ids = np.array([tokenizer.encode("def loads(s):\n    return json.loads(s)\n")])
    expected = np.array(model(mx.array(ids)))
    got = npm.forward(ids)
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    cache = npm.new_cache()
    pieces = [npm.forward(ids[:, :4], cache), npm.forward(ids[:, 4:], cache)]
    assert np.abs(np.concatenate(pieces, axis=1) - got).max() < 1e-4 * np.abs(got).max()


def test_left_padded_batch_decodes_like_each_prompt_alone():
    npm, tokenizer = NpModel.load(DEMO_MODEL_DIR)
    a, b = tokenizer.encode("import os\n"), tokenizer.encode("class Parser:\n    def")
    together = npm.generate([a, b], 6, 0.0, 0, set())
    assert together == [npm.generate([a], 6, 0.0, 0, set())[0],
                        npm.generate([b], 6, 0.0, 0, set())[0]]


def test_weighted_fit_lowers_the_weighted_error_and_ones_change_nothing():
    rng = np.random.default_rng(0)
    w = rng.standard_t(4, size=(64, 256)).astype(np.float32) * 0.02
    importance = np.exp(rng.normal(0, 2, size=256)).astype(np.float32)  # outlier channels

    def weighted_error(codes, scales, biases):
        diff = affine.dequantize(codes, scales, biases, 64) - w
        return float(np.einsum("ij,ij,j->", diff, diff, importance))

    plain = fit.fit(w, 3, 64)
    weighted = fit.fit(w, 3, 64, importance=importance)
    assert weighted_error(*weighted) < 0.9 * weighted_error(*plain)
    flat = fit.fit(w, 3, 64, importance=np.ones(256, np.float32))
    assert np.array_equal(flat[0], plain[0])
    with pytest.raises(ValueError, match="channels"):
        fit.fit(w, 3, 64, importance=np.ones(128, np.float32))


@pytest.fixture(scope="module")
def measured(qwen3_checkpoint: Path):
    manifest = analyze_checkpoint(qwen3_checkpoint, progress=False)
    sens, moments = measure(qwen3_checkpoint, manifest, load_recipe("budget"), options=QUICK)
    return qwen3_checkpoint, manifest, sens, moments


def test_moments_cover_every_linear_and_errors_fall_with_bits(measured):
    src, _, sens, moments = measured
    ckpt = open_checkpoint(src)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    for t in name_map.quantizable():
        m = moments[t.sources[0]]
        assert m.shape == (t.shape[-1],) and m.dtype == np.float32 and np.all(m >= 0)
        errors = sens.errors[t.module]
        by_bits = [errors[(b, 64)] for b in (2, 3, 4, 5, 6, 8) if (b, 64) in errors]
        assert by_bits == sorted(by_bits, reverse=True)
    assert sens.class_gain and all(g > 0 for g in sens.class_gain.values())


def test_output_plan_meets_the_budget_and_is_deterministic(measured, tmp_path):
    src, manifest, sens, _ = measured
    ckpt = open_checkpoint(src)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    plan = build_plan(manifest, name_map, load_recipe("budget"), 4.5, sensitivity=sens)
    assert plan.achieved_bpw <= 4.5 + 1e-9
    assert all("predicted KL" in d.reason for d in plan.decisions.values() if d.quantized)
    sens.save(tmp_path / "s.json")
    again = build_plan(manifest, name_map, load_recipe("budget"), 4.5,
                       sensitivity=Sensitivity.load(tmp_path / "s.json"))
    plan.save(tmp_path / "a.json")
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    sens2, _ = measure(src, manifest, load_recipe("budget"), options=QUICK)
    assert sens2.errors == sens.errors and sens2.class_gain == sens.class_gain
    assert Sensitivity.load(tmp_path / "s.json").module_gain == sens.module_gain


def test_edge_layer_modules_get_their_own_gain():
    """The demo model's first residual is tiny: its layer-0 o_proj costs far more KL per
    unit of predicted error than the o_proj of the middle layers (the class gain), and
    the gain it gets alone is what the budget uses for it."""
    src = Path(DEMO_MODEL_DIR)
    manifest = analyze_checkpoint(src, progress=False)
    sens, _ = measure(src, manifest, load_recipe("budget"), options=QUICK)
    layers = open_checkpoint(src).config["num_hidden_layers"]
    edge = {0, 1, layers - 1}
    assert {int(m.split(".")[2]) for m in sens.module_gain} <= edge
    assert all(int(m.split(".")[2]) in edge for m in sens.module_gain)
    o0 = "model.layers.0.self_attn.o_proj"
    assert sens.module_gain[o0] > 10 * sens.class_gain["attention_o"]
    setting = next(iter(sens.errors[o0]))
    assert sens.loss(o0, "attention_o", setting) == sens.module_gain[o0] * sens.errors[o0][setting]


SMOLLM2 = Path(os.environ.get("SWAN_SMOLLM2_DIR",
                              Path.home() / ".cache" / "swan-serve-bench" / "smollm2"))


@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(),
                    reason=f"SmolLM2 reference not built at {SMOLLM2} "
                           "(python scripts/smollm2_reference.py)")
def test_smollm2_reference_answers_in_english():
    npm, tokenizer = NpModel.load(SMOLLM2)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True)
    answer = tokenizer.decode(npm.generate([prompt], 8, 0.0, 0, {tokenizer.eos_token_id})[0])
    assert "Paris" in answer

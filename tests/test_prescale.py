"""Pre-scaling (issue 14 items 4 and 6): folds are exact, AWQ lowers the weighted error,
and a folded, quantized checkpoint loads and generates in stock mlx_lm."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.generate import generate

from swan_serve import DEMO_MODEL_DIR
from swan_serve.quant import affine, fit
from swan_serve.quant import moments as moments_mod
from swan_serve.quant.build import BuildError, quantize_model
from swan_serve.quant.cli import main as quant_main
from swan_serve.quant.fold_groups import fold_groups
from swan_serve.quant.folded import FoldedCheckpoint, fold, fold_moments, prescaled
from swan_serve.quant.mlx_names import build_model, build_name_map, checkpoint_shapes
from swan_serve.quant.npmodel import NpModel
from swan_serve.quant.prescale import GroupScale, SearchSetting, group_scales, slot_moments
from swan_serve.quant.sources.checkpoint import Checkpoint, open_checkpoint

TEXT = ("The lighthouse keeper climbed the stairs every evening to light the lamp. "
        "Ships passing in the night relied on its steady beam to avoid the rocks. "
        "def reverse(items):\n    return items[::-1]\n"
        "Compound interest grows savings because interest is earned on interest.")


def float32_model(ckpt: Checkpoint):
    """mlx_lm's model for `ckpt`, every tensor read through the checkpoint in float32."""
    model = build_model(ckpt.config)
    weights = model.sanitize({t.name: mx.array(ckpt.read(t.name)) for t in ckpt.tensors})
    model.load_weights(list(weights.items()), strict=True)
    model.set_dtype(mx.float32)
    return model


def random_scales(groups, seed: int = 0) -> dict[str, GroupScale]:
    rng = np.random.default_rng(seed)
    return {g.name: GroupScale(np.exp(rng.normal(0.0, 0.7, g.size)).astype(np.float32),
                               1.0, 0.0, 0.0) for g in groups}


def demo_moments(model: NpModel | None = None, ckpt: Checkpoint | None = None):
    """Real moments: the (float) demo model run on a short English and code text."""
    ckpt = ckpt or open_checkpoint(DEMO_MODEL_DIR)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    modules = {t.module: t.sources[0] for t in name_map.quantizable() if len(t.sources) == 1}
    loaded, tokenizer = NpModel.load(DEMO_MODEL_DIR)
    tokens = tokenizer.encode(TEXT)
    return moments_mod.record(model or loaded, [tokens], modules)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "qwen3_5_moe"])
def test_folding_leaves_float32_logits_unchanged(tiny_checkpoint, arch: str) -> None:
    base = open_checkpoint(tiny_checkpoint(arch))
    name_map = build_name_map(base.config, checkpoint_shapes(base))
    groups = fold_groups(base.config, name_map)
    kinds = {g.name.split(".")[-1].split("[")[0] for g in groups}
    assert {"input_layernorm", "post_attention_layernorm", "down_proj", "o_proj"} <= kinds
    view = fold(base, name_map, groups, random_scales(groups))
    for g in groups:  # every consumer really is scaled (so equal logits mean something)
        t, slot = g.consumers[0]
        assert t.slots[slot][0].hf_name in view.cols
    tokens = mx.array([[3, 17, 42, 99, 5, 64, 7, 120, 11, 2]])
    before = np.array(float32_model(base)(tokens))
    after = np.array(float32_model(view)(tokens))
    assert np.abs(after - before).max() <= 1e-5 * max(1.0, np.abs(before).max()) * 10


def test_qwen3_5_groups_share_one_scale_across_their_modules(tiny_checkpoint) -> None:
    base = open_checkpoint(tiny_checkpoint("qwen3_5_moe"))
    name_map = build_name_map(base.config, checkpoint_shapes(base))
    groups = {g.name: g for g in fold_groups(base.config, name_map)}
    attn = groups["language_model.model.layers.0.input_layernorm"]
    mlp = groups["language_model.model.layers.0.post_attention_layernorm"]
    assert {t.module.rsplit(".", 1)[1] for t, _ in attn.consumers} == {
        "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b"}
    assert {t.module.split(".mlp.")[1] for t, _ in mlp.consumers} == {
        "gate", "switch_mlp.gate_proj", "switch_mlp.up_proj", "shared_expert.gate_proj",
        "shared_expert.up_proj", "shared_expert_gate"}
    # linear attention's out_proj follows a gated norm: never a row fold
    assert not any("out_proj" in name for name in groups)
    view = fold(base, name_map, list(groups.values()), random_scales(groups.values()))
    stacked = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    rows = view.rows[stacked]  # up half scaled per expert, gate half untouched
    assert np.all(rows[:, :128] == 1.0) and not np.allclose(rows[:, 128:], 1.0)
    assert not np.allclose(rows[0, 128:], rows[1, 128:])


def test_folded_moments_are_what_the_folded_model_sees() -> None:
    base = open_checkpoint(DEMO_MODEL_DIR)
    name_map = build_name_map(base.config, checkpoint_shapes(base))
    groups = fold_groups(base.config, name_map)
    view = fold(base, name_map, groups, random_scales(groups, seed=1))
    moments = demo_moments()
    seen = demo_moments(NpModel.from_mlx(float32_model(view), base.config), view)
    expected = fold_moments(moments, view)
    for name in moments:
        np.testing.assert_allclose(seen[name], expected[name], rtol=2e-3, atol=1e-6)
    changed = [n for n in moments if not np.allclose(expected[n], moments[n])]
    assert len(changed) >= 4 * 7  # q k v o gate up down of 4 layers


def _weighted_error(ckpt: Checkpoint, moments, name_map, bits=4, group_size=64) -> float:
    """sum over every layer module of E||(W - W_hat) x||^2 for whole weights, fitted as
    convert fits them (importance: the moments the module sees), the error taken back
    to the float model's units (its moments)."""
    total = 0.0
    for t in name_map.quantizable():
        if ".layers." not in t.module:
            continue
        d = slot_moments(moments, t, 0)
        name = t.sources[0]
        w = ckpt.read(name)
        col = ckpt.cols.get(name, 1.0) if isinstance(ckpt, FoldedCheckpoint) else 1.0
        row = ckpt.rows.get(name, np.ones(1)) if isinstance(ckpt, FoldedCheckpoint) else 1.0
        codes, scales, biases = fit.fit(w, bits, group_size, "float32", fit.FAST,
                                        importance=d / np.square(col))
        diff = (affine.dequantize(codes, scales, biases, group_size) - w) / col
        diff /= np.reshape(row, (-1, 1))
        total += float(np.einsum("ij,ij->j", diff, diff) @ d)
    return total


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_with_real_moments_lowers_weighted_error_on_demo_model(bits: int) -> None:
    moments = demo_moments()
    base = open_checkpoint(DEMO_MODEL_DIR)
    name_map = build_name_map(base.config, checkpoint_shapes(base))
    view = prescaled(DEMO_MODEL_DIR, "awq", moments, SearchSetting(bits=bits))
    assert any(g.alpha > 0 for g in view.chosen.values())
    plain = _weighted_error(base, moments, name_map, bits)
    scaled = _weighted_error(view, moments, name_map, bits)
    assert scaled < 0.99 * plain, (scaled, plain)
    # and the search never picks a scale worse than none on its own sample
    assert all(g.error <= g.error_unscaled for g in view.chosen.values())


def test_group_scales_need_moments_for_awq() -> None:
    base = open_checkpoint(DEMO_MODEL_DIR)
    groups = fold_groups(base.config, build_name_map(base.config, checkpoint_shapes(base)))
    with pytest.raises(ValueError, match="needs input moments"):
        group_scales(base, groups, "awq", None)


def test_unknown_architecture_has_no_fold_groups(tiny_checkpoint) -> None:
    base = open_checkpoint(tiny_checkpoint("qwen3"))
    name_map = build_name_map(base.config, checkpoint_shapes(base))
    assert fold_groups({**base.config, "model_type": "gemma3_text"}, name_map) == []


@pytest.mark.parametrize("arch,method", [("qwen3_moe", "equalize"), ("qwen3_5_moe", "equalize")])
def test_folded_quantized_checkpoint_generates_in_mlx_lm(tiny_checkpoint, tmp_path, arch,
                                                         method) -> None:
    out = tmp_path / "q"
    quantize_model(tiny_checkpoint(arch), out, recipe="uniform-4bit", target_bpw=None,
                   prescale=method, progress=False)
    model, tokenizer = load(str(out))
    model.set_dtype(mx.float32)  # MLX's CPU gather-matmul lacks bf16
    text = generate(model, tokenizer, "Hello", max_tokens=4)
    assert isinstance(text, str)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_swan_quant_convert_with_moments_uses_awq(tmp_path, capsys) -> None:
    moments = demo_moments()
    path = tmp_path / "m.npz"
    moments_mod.save(moments, path)
    out = tmp_path / "awq"
    assert quant_main(["convert", str(DEMO_MODEL_DIR), "-o", str(out), "--recipe",
                       "uniform-4bit", "--moments", str(path)]) == 0
    assert "awq: pre-scaled" in capsys.readouterr().out
    model, tokenizer = load(str(out))
    assert isinstance(generate(model, tokenizer, "The sky", max_tokens=3), str)
    flat = tmp_path / "flat"
    assert quant_main(["convert", str(DEMO_MODEL_DIR), "-o", str(flat), "--recipe",
                       "uniform-4bit", "--moments", str(path), "--no-awq"]) == 0
    assert "pre-scaled" not in capsys.readouterr().out
    # folded norms differ from the source's; without AWQ they are the source's
    awq, plain = (mx.load(str(d / "model.safetensors")) for d in (out, flat))
    norms = [k for k in plain if k.endswith("layernorm.weight")]
    assert norms and any(not mx.array_equal(awq[k], plain[k]).item() for k in norms)
    # validate refolds the float source with the build's factors: the folded norms then
    # equal the reference's exactly; without the factors they cannot
    from swan_serve.quant.folded import FOLDS_FILE
    from swan_serve.quant.validate import validate

    assert (out / FOLDS_FILE).is_file() and not (flat / FOLDS_FILE).exists()
    report = validate(out, DEMO_MODEL_DIR, threshold=0.99, progress=False)
    assert report.passed and report.notes, [t.key for t in report.failed]
    (out / FOLDS_FILE).unlink()
    unfolded = validate(out, DEMO_MODEL_DIR, threshold=0.99, progress=False)
    assert {t.key for t in unfolded.failed} & set(norms)


def test_bad_moments_file_is_one_line_error(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    code = quant_main(["convert", str(DEMO_MODEL_DIR), "-o", str(tmp_path / "o"),
                       "--moments", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("swan-quant: error: cannot read moments file")
    assert err.count("\n") == 1


def test_moments_for_another_model_are_refused(tmp_path) -> None:
    with pytest.raises(BuildError, match="name no weight"):
        quantize_model(DEMO_MODEL_DIR, tmp_path / "o", moments={"x.weight": np.ones(4)},
                       prescale="awq", progress=False)


def test_swan_serve_flags_reach_the_build_and_its_cache_key(tmp_path) -> None:
    from swan_serve.quant.build import BuildOptions, prepare_build
    from swan_serve.server.cli import build_parser

    path = tmp_path / "m.npz"
    moments_mod.save({"model.layers.0.mlp.down_proj.weight": np.ones(768)}, path)
    args = build_parser().parse_args(["--moments", str(path), "--no-awq", "--equalize"])
    assert (args.moments, args.no_awq, args.equalize) == (str(path), True, True)
    variants = [{}, {"moments_file": str(path)}, {"moments_file": str(path), "no_awq": True},
                {"equalize": True}]
    prepared = [prepare_build(str(DEMO_MODEL_DIR), BuildOptions(cache_dir=tmp_path / "c", **v))
                for v in variants]
    assert len({p.key for p in prepared}) == 4  # a build with other moments is not reused
    assert [p.identity.get("prescale") for p in prepared] == [None, "awq", None, "equalize"]
    assert "moments" not in prepared[0].identity  # old cache keys stay as they were

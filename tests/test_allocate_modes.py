"""The budget chooses MLX modes: mxfp4/nvfp4/mxfp8 candidates measured with quant/modes.py."""

from __future__ import annotations

import numpy as np
import pytest

from swan_serve.quant import modes
from swan_serve.quant import settings as setting_mod
from swan_serve.quant.allocate import AllocationError, build_plan
from swan_serve.quant.analyze import analyze_checkpoint
from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes, read_slot_rows
from swan_serve.quant.recipe import RecipeError, load_recipe
from swan_serve.quant.sensitivity import (
    Sensitivity,
    candidate_errors,
    module_errors,
    relative_mode_errors,
)
from swan_serve.quant.sources.checkpoint import open_checkpoint


@pytest.fixture(scope="module")
def analysed(tiny_checkpoint):
    src = tiny_checkpoint("qwen3", tokenizer="small")
    ckpt = open_checkpoint(src)
    return ckpt, analyze_checkpoint(src, progress=False), build_name_map(
        ckpt.config, checkpoint_shapes(ckpt))


def g64_only(objective: str):
    """Affine restricted to group 64 (2.5, 3.5, 4.5 ... bpw): at a 4.25 bpw target
    4-bit affine does not fit, mxfp4 (4.25 bpw, ~half 3-bit's error) does."""
    recipe = load_recipe("budget-mxfp")
    budget = recipe.budget.model_copy(update={"group_sizes": [64], "objective": objective})
    return recipe.model_copy(update={"budget": budget})


def check_bpw(plan) -> None:
    bits = plan.float_params * 16.0
    for d in plan.decisions.values():
        if d.quantized and d.mode != "affine":
            assert (d.bits, d.group_size) == (modes.BITS[d.mode], modes.GROUP_SIZE[d.mode])
            bits += d.params * (d.bits + 8 / d.group_size)
        elif d.quantized:
            bits += d.params * (d.bits + 32 / d.group_size)
        else:
            bits += d.params * 16.0
    assert plan.achieved_bpw == pytest.approx(bits / plan.total_params, rel=1e-12)
    assert plan.achieved_bpw <= 4.25 + 1e-9


def test_weight_objective_picks_mxfp4_where_it_beats_affine(analysed):
    ckpt, manifest, name_map = analysed
    recipe = g64_only("weight")
    with pytest.raises(AllocationError, match="no weight error measured"):
        build_plan(manifest, name_map, recipe, 4.25)
    errors = relative_mode_errors(ckpt, name_map, recipe.budget.modes)
    plan = build_plan(manifest, name_map, recipe, 4.25, mode_errors=errors)
    chosen = {d.mode for d in plan.decisions.values() if d.quantized}
    assert "mxfp4" in chosen
    check_bpw(plan)
    affine_only = build_plan(manifest, name_map, load_recipe("budget").model_copy(
        update={"budget": recipe.budget.model_copy(update={"modes": ["affine"]})}), 4.25)
    assert {d.mode for d in affine_only.decisions.values()} == {"affine"}


def test_output_objective_picks_a_float_mode_and_round_trips(analysed, tmp_path):
    ckpt, manifest, name_map = analysed
    recipe = g64_only("output")
    from swan_serve.quant.allocate import budget_settings, build_units

    settings = budget_settings(build_units(manifest, name_map, recipe), recipe)
    assert any(setting_mod.mode_of(s) == "nvfp4" for ss in settings.values() for s in ss)
    sens = Sensitivity(errors=candidate_errors(ckpt, name_map, {}, settings))
    plan = build_plan(manifest, name_map, recipe, 4.25, sensitivity=sens)
    assert {d.mode for d in plan.decisions.values() if d.quantized} & set(modes.FLOAT_MODES)
    check_bpw(plan)
    sens.save(tmp_path / "s.json")
    assert '"4/32/mxfp4"' in (tmp_path / "s.json").read_text()
    assert Sensitivity.load(tmp_path / "s.json").errors == sens.errors


def test_mode_errors_are_the_numpy_model_errors(analysed):
    ckpt, _, name_map = analysed
    t = next(t for t in name_map.quantizable() if t.module.endswith("mlp.down_proj"))
    w = read_slot_rows(ckpt, t.slots[0], 0, t.shape[-2])
    d = np.random.default_rng(0).uniform(0.5, 2.0, t.shape[-1]).astype(np.float32)
    moments = {t.sources[0]: d}
    cands = setting_mod.float_mode_settings(list(modes.FLOAT_MODES), t.shape[-1])
    got = module_errors(ckpt, t, moments, cands, "bfloat16", source_dtype="bfloat16")
    for s in cands:
        diff = modes.error(w, setting_mod.mode_of(s), "bfloat16")
        assert got[s] == pytest.approx(float(np.einsum("ij,ij,j->", diff, diff, d)), rel=1e-3)
    rel = relative_mode_errors(ckpt, name_map, ["mxfp8"])[t.module][(8, 32, "mxfp8")]
    assert rel == pytest.approx(modes.rel_rms_error(w, "mxfp8", "bfloat16") ** 2, rel=1e-3)


def test_old_sensitivity_labels_still_load(tmp_path):
    path = tmp_path / "old.json"
    path.write_text('{"class_gain": {"mlp_up": 2.0}, "errors": {"m": {"4/64": 1.5}}}')
    assert Sensitivity.load(path).errors == {"m": {(4, 64): 1.5}}


def test_recipe_modes_are_checked():
    assert load_recipe("budget").budget.modes == ["affine"]
    assert load_recipe("budget-mxfp").budget.modes == ["affine", "mxfp4", "mxfp8", "nvfp4"]
    from swan_serve.quant.recipe import Budget

    with pytest.raises(ValueError, match="modes must be"):
        Budget(modes=["fp3"])
    with pytest.raises(RecipeError):
        load_recipe("no-such-recipe")

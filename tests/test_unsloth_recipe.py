"""--recipe unsloth / unsloth-mxfp: bits per module as Unsloth's table says, on real
fixture checkpoints; the recipe as a floor under a budget; an unsloth conversion that
loads and generates in stock mlx_lm; bad --q-bits is a one-line error."""

from __future__ import annotations

import re

import pytest
from mlx_lm import generate, load

from swan_serve.quant.allocate import AllocationError, build_plan
from swan_serve.quant.analyze import analyze_checkpoint
from swan_serve.quant.build import BuildError, BuildOptions, prepare_build
from swan_serve.quant.cli import main
from swan_serve.quant.convert import quantization_config
from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes
from swan_serve.quant.plan import PLAN_FILE, Plan
from swan_serve.quant.recipe import RecipeError, load_recipe, with_base_bits
from swan_serve.quant.sources.checkpoint import open_checkpoint
from swan_serve.quant.validate import validate

ARCHS = ("qwen3", "qwen3_moe", "qwen3_5_moe")


@pytest.fixture(scope="module", params=ARCHS)
def analysed(request, tiny_checkpoint):
    src = tiny_checkpoint(request.param, tokenizer="small")
    ckpt = open_checkpoint(src)
    return request.param, analyze_checkpoint(src, progress=False), build_name_map(
        ckpt.config, checkpoint_shapes(ckpt))


def expected_unsloth(module: str, d: int, g: int) -> tuple[int, int]:
    """Unsloth's table, written out by module name (not through the recipe's classes)."""
    leaf = module.rsplit(".", 1)[-1]
    snap = {7: 8}.get
    if leaf in ("o_proj", "out_proj", "in_proj_a", "in_proj_b", "shared_expert_gate"):
        return 8, 64
    if leaf == "gate" and module.endswith("mlp.gate"):
        return 8, 64
    if leaf in ("q_proj", "k_proj", "v_proj", "in_proj_qkv", "in_proj_z", "embed_tokens"):
        return d + 2, g
    if leaf == "lm_head":
        return snap(d + 3, d + 3), g
    if leaf in ("gate_proj", "up_proj"):
        return d, g
    if leaf == "down_proj":
        return d + 1, g
    raise AssertionError(f"the table has no row for {module}")


@pytest.mark.parametrize("d", [3, 4])
def test_unsloth_bits_per_module_follow_the_table(analysed, d):
    arch, manifest, name_map = analysed
    plan = build_plan(manifest, name_map, with_base_bits(load_recipe("unsloth"), d, None))
    assert plan.target_bpw is None
    assert set(plan.decisions) == {t.module for t in name_map.quantizable()}
    for module, decision in plan.decisions.items():
        assert (decision.bits, decision.group_size, decision.mode) == (
            *expected_unsloth(module, d, 64), "affine"), module
    roles = {m.rsplit(".", 1)[-1] for m in plan.decisions}
    if arch == "qwen3_5_moe":  # linear attention and the shared expert are covered
        assert {"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj",
                "shared_expert_gate"} <= roles
        assert any(".shared_expert.gate_proj" in m for m in plan.decisions)
    if arch != "qwen3":
        assert "gate" in roles  # the MoE router


def test_q_group_size_moves_only_the_d_rules(analysed):
    _, manifest, name_map = analysed
    plan = build_plan(manifest, name_map, with_base_bits(load_recipe("unsloth"), 4, 128))
    for module, decision in plan.decisions.items():
        bits, group = expected_unsloth(module, 4, 128)
        in_dim = decision.in_dim
        assert decision.bits == bits, module
        assert decision.group_size == (group if in_dim % group == 0 else 64), module


def test_unsloth_mxfp_layout_at_plan_level(tiny_checkpoint):
    src = tiny_checkpoint("qwen3_5_moe", tokenizer="small")
    ckpt = open_checkpoint(src)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    manifest = analyze_checkpoint(src, progress=False)
    recipe = load_recipe("unsloth-mxfp")
    # The fixture has 4 layers; with "last 2" both halves of the rule are exercised.
    two = recipe.model_copy(update={"classes": recipe.classes.model_copy(
        update={"last_layers": 2})})
    for r, last in ((recipe, 8), (two, 2)):
        plan = build_plan(manifest, name_map, r)
        for module, d in plan.decisions.items():
            leaf = module.rsplit(".", 1)[-1]
            layer = int(m.group(1)) if (m := re.search(r"layers\.(\d+)\.", module)) else None
            if leaf in ("in_proj_a", "in_proj_b", "shared_expert_gate") or \
                    module.endswith("mlp.gate"):
                assert not d.quantized, module
            elif leaf in ("gate_proj", "up_proj", "down_proj"):
                want = "mxfp8" if layer >= 4 - last else "mxfp4"
                assert (d.mode, d.bits, d.group_size) == (
                    want, 8 if want == "mxfp8" else 4, 32), module
            else:  # attention, linear-attention qkv/z/out, embedding, lm_head
                assert (d.mode, d.bits, d.group_size) == ("mxfp8", 8, 32), module
        quant = quantization_config(plan)  # what the converter will write per module
        for module, d in plan.decisions.items():
            assert quant[module] == ({"group_size": 32, "bits": d.bits, "mode": d.mode}
                                     if d.quantized else False)
    assert {d.mode for d in plan.decisions.values()} == {"affine", "mxfp4", "mxfp8"}


def test_the_recipe_is_a_floor_under_a_budget(analysed):
    _, manifest, name_map = analysed
    recipe = load_recipe("unsloth")
    floor = build_plan(manifest, name_map, recipe)
    target = floor.achieved_bpw + 0.75
    plan = build_plan(manifest, name_map, recipe, target)
    assert target - 0.05 <= plan.achieved_bpw <= target + 1e-9
    raised = 0
    for module, d in plan.decisions.items():
        f = floor.decisions[module]
        assert d.bits >= f.bits and d.bpw >= f.bpw, module
        raised += d.bpw > f.bpw
    assert raised > 0
    with pytest.raises(AllocationError, match="below unsloth's own"):
        build_plan(manifest, name_map, recipe, floor.achieved_bpw - 0.25)


def test_unsloth_conversion_loads_generates_and_validates(tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint("qwen3_moe", tokenizer="small")
    out = tmp_path / "q"
    assert main(["convert", str(src), "-o", str(out), "--recipe", "unsloth", "--q-bits", "3",
                 "--no-progress"]) == 0
    assert "recipe unsloth" in capsys.readouterr().out
    plan = Plan.load(out / PLAN_FILE)
    model, tokenizer = load(str(out))
    modules = dict(model.named_modules())
    for module in plan.decisions:
        assert (modules[module].bits, modules[module].group_size) == expected_unsloth(
            module, 3, 64), module
    text = generate(model, tokenizer, "def add(a, b):", max_tokens=4)
    assert isinstance(text, str) and text
    report = validate(out, src, threshold=0.95, progress=False)
    assert report.passed, [t.key for t in report.failed]


def test_bad_q_bits_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys):
    src = str(tiny_checkpoint("qwen3", tokenizer="small"))
    assert main(["convert", src, "-o", str(tmp_path / "a"), "--recipe", "unsloth",
                 "--q-bits", "7"]) == 2
    assert main(["convert", src, "-o", str(tmp_path / "b"), "--recipe", "unsloth",
                 "--q-group-size", "48"]) == 2
    assert main(["convert", src, "-o", str(tmp_path / "c"), "--q-bits", "3"]) == 2  # budget
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("swan-quant: error: ") for e in errors)
    assert "--q-bits must be one of" in errors[0] and "--q-group-size" in errors[1]
    assert not (tmp_path / "a").exists()
    with pytest.raises(RecipeError):
        with_base_bits(load_recipe("unsloth"), 1, None)


def test_q_bits_is_part_of_the_cache_key(tiny_checkpoint, tmp_path):
    src = str(tiny_checkpoint("qwen3", tokenizer="small"))
    keys = {prepare_build(src, BuildOptions(recipe="unsloth", q_bits=b, cache_dir=tmp_path)).key
            for b in (3, 4)}
    keys.add(prepare_build(src, BuildOptions(recipe="unsloth", q_group_size=128,
                                             cache_dir=tmp_path)).key)
    assert len(keys) == 3
    plain = prepare_build(src, BuildOptions(recipe="unsloth", cache_dir=tmp_path))
    assert plain.options.target_bpw is None  # used as it is: no budget
    budget = prepare_build(src, BuildOptions(cache_dir=tmp_path))
    assert budget.options.target_bpw == 4.5
    with pytest.raises(BuildError, match="--q-bits"):
        prepare_build(src, BuildOptions(recipe="unsloth", q_bits=9, cache_dir=tmp_path))


def test_unsloth_mxfp_converts_loads_and_generates(tiny_checkpoint, tmp_path):
    src = str(tiny_checkpoint("qwen3_5_moe", tokenizer="small"))
    out = tmp_path / "m"
    assert main(["convert", src, "-o", str(out), "--recipe", "unsloth-mxfp",
                 "--no-progress"]) == 0
    modes = {v["mode"] for v in Plan.load(out / PLAN_FILE).model_dump()["decisions"].values()
             if v["bits"] is not None}
    assert "mxfp8" in modes  # four layers: all of them among the last 8
    model, tokenizer = load(str(out))
    assert isinstance(generate(model, tokenizer, "def add(a, b):", max_tokens=4), str)

"""quant/knapsack.py + quant/allocate.py: the budget is met, the loss is minimal,
and the rules hold on real fixture checkpoints."""

from __future__ import annotations

import itertools
import random

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load

from swan_serve.quant.allocate import AllocationError, build_plan
from swan_serve.quant.analyze import analyze_checkpoint
from swan_serve.quant.convert import convert
from swan_serve.quant.fixtures import ARCHITECTURES
from swan_serve.quant.knapsack import BudgetError, Option, solve, total
from swan_serve.quant.manifest import Manifest
from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes
from swan_serve.quant.recipe import RecipeError, load_recipe
from swan_serve.quant.scoring import load_config, score
from swan_serve.quant.sources.checkpoint import open_checkpoint


def brute_force(units: list[list[Option]], budget: float) -> float:
    best = float("inf")
    for choice in itertools.product(*(range(len(u)) for u in units)):
        cost, loss = total(units, list(choice))
        if cost <= budget:
            best = min(best, loss)
    return best


def random_units(rng: random.Random, n_units: int) -> list[list[Option]]:
    units = []
    for _ in range(n_units):
        params = rng.choice([64, 256, 1024])
        prior = rng.uniform(0.1, 10)
        options = []
        for bits in (2, 3, 4, 6, 8):
            for group in (32, 128):
                err = 4.0 ** (-bits) * (1 + 64 / group) * rng.uniform(0.8, 1.2)
                options.append(Option(params * (bits + 32 / group), prior * err * params))
        units.append(options)
    return units


@pytest.mark.parametrize("seed", range(12))
def test_solution_fits_and_is_near_the_exact_optimum(seed):
    rng = random.Random(seed)
    units = random_units(rng, 4)
    cheapest = sum(min(o.cost for o in u) for u in units)
    dearest = sum(max(o.cost for o in u) for u in units)
    budget = rng.uniform(cheapest, dearest)
    chosen = solve(units, budget)
    cost, loss = total(units, chosen)
    assert cost <= budget
    optimum = brute_force(units, budget)
    assert loss <= optimum * (1 + 1e-9)  # small problems: exact


def test_budget_is_used_up_on_many_units():
    units = random_units(random.Random(7), 120)
    params = sum(min(o.cost for o in u) / 2.25 for u in units)  # 2-bit g128 costs 2.25
    for bpw in (3.0, 4.5, 6.0):
        cost, _ = total(units, solve(units, bpw * params))
        assert bpw - 0.02 <= cost / params <= bpw


def test_more_budget_never_costs_loss():
    units = random_units(random.Random(3), 40)
    params = sum(min(o.cost for o in u) / 2.25 for u in units)
    losses = [total(units, solve(units, bpw * params))[1] for bpw in (3.0, 3.5, 4.0, 5.0)]
    assert losses == sorted(losses, reverse=True)


def test_impossible_budget_is_an_error():
    units = random_units(random.Random(1), 5)
    with pytest.raises(BudgetError):
        solve(units, 1.0)


# --- allocation on real fixture checkpoints -------------------------------------------


@pytest.fixture(scope="module", params=ARCHITECTURES)
def analysed(request, tiny_checkpoint):
    src = tiny_checkpoint(request.param, tokenizer="small")
    ckpt = open_checkpoint(src)
    return src, analyze_checkpoint(src, progress=False), build_name_map(
        ckpt.config, checkpoint_shapes(ckpt))


@pytest.mark.parametrize("target", [4.5, 4.0])
def test_budget_is_met_and_rules_hold(analysed, target):
    _, manifest, name_map = analysed
    plan = build_plan(manifest, name_map, load_recipe("budget"), target)
    assert target - 0.02 <= plan.achieved_bpw <= target + 1e-9
    records = {r.name: r for r in manifest.tensors}
    assert set(plan.decisions) == {t.module for t in name_map.quantizable()}
    for t in name_map.quantizable():
        d = plan.decisions[t.module]
        classes = {records[s].tensor_class for s in t.sources}
        if d.quantized:
            assert t.shape[-1] % d.group_size == 0
            if "router" in classes:
                assert d.bits >= 8, t.module
            assert d.bits >= max(records[s].min_bits for s in t.sources)
    # Everything the analyzer keeps in float (norms, 1-D, conv, A_log, dt_bias) is no
    # quantizable module at all: it is written as a float tensor.
    kept = {r.name for r in manifest.tensors if not r.quantizable}
    quantized_sources = {s for t in name_map.quantizable() for s in t.sources}
    assert not kept & quantized_sources


def test_converted_budget_model_keeps_rules_in_mlx(analysed, tmp_path):
    src, manifest, name_map = analysed
    plan = build_plan(manifest, name_map, load_recipe("budget"), 4.0)
    convert(src, tmp_path / "m", plan, method="rtn", progress=False)
    model, _ = load(str(tmp_path / "m"))
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if "norm" in leaf or leaf in ("conv1d",):
            assert not hasattr(module, "bits"), path
        if leaf in ("gate", "shared_expert_gate"):
            assert module.bits >= 8, path
    for key, value in tree_flatten(model.parameters()):
        if key.endswith(("A_log", "dt_bias", "norm.weight", "layernorm.weight", "conv1d.weight")):
            assert value.dtype in (mx.bfloat16, mx.float32), key


def test_thresholds_follow_the_reference_bands(analysed, tmp_path):
    _, manifest, name_map = analysed
    scoring = tmp_path / "scoring.toml"
    # Bands chosen around this model's own composites so that every band is used.
    config = load_config("swan-reference-v2")
    comps = sorted(
        score(r.metrics.spectral_concentration, r.metrics.excess_kurtosis,
              r.metrics.noise_amplification, r.metrics.rel_rms_error, config)[1]
        for r in manifest.quantizable()
    )
    q = np.quantile(comps, [0.15, 0.6, 0.9])
    scoring.write_text(
        'name = "t"\n[score]\nnormalisation = "clip_linear"\n'
        "[score.weights]\nspectral = 0.20\nkurtosis = 0.45\nnoise = 0.15\nerror = 0.20\n"
        "[score.bounds]\nspectral = [0.10, 0.90]\nkurtosis = [0.0, 10.0]\n"
        "noise = [0.0, 0.5]\nerror = [0.0, 0.5]\n"
        f"[thresholds]\nbits16 = {q[2]}\nbits8 = {q[1]}\nbits2 = {q[0]}\n"
    )
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(
        f'name = "t"\nmode = "thresholds"\n[thresholds]\nscoring = "{scoring}"\n'
        "[rules]\nmin_bits = {}\n"
    )
    plan = build_plan(manifest, name_map, load_recipe(recipe_file))
    records = {r.name: r for r in manifest.tensors}
    seen = set()
    for t in name_map.quantizable():
        recs = [records[s] for s in t.sources]
        c = np.average([score(r.metrics.spectral_concentration, r.metrics.excess_kurtosis,
                              r.metrics.noise_amplification, r.metrics.rel_rms_error,
                              config)[1] for r in recs], weights=[r.params for r in recs])
        want = None if c >= q[2] else 8 if c >= q[1] else 2 if c < q[0] else 4
        if want is not None:
            want = max(want, max(r.min_bits for r in recs))
        got = plan.decisions[t.module].bits
        assert got == want, (t.module, c, got, want)
        seen.add(want)
    assert len(seen) >= 3


def test_a_manifest_entry_without_module_is_an_error(analysed):
    _, manifest, name_map = analysed
    extra = manifest.tensors[0].model_copy(update={"name": "model.layers.0.mlp.extra.weight"})
    broken = manifest.model_copy(update={"tensors": [*manifest.tensors, extra]})
    with pytest.raises(AllocationError, match="maps to no MLX module"):
        build_plan(broken, name_map, load_recipe("budget"))


def test_impossible_target_and_unknown_recipe_are_clear_errors(analysed):
    _, manifest, name_map = analysed
    with pytest.raises(AllocationError, match="below the smallest possible"):
        build_plan(manifest, name_map, load_recipe("budget"), 1.5)
    with pytest.raises(RecipeError, match="bundled recipes: budget"):
        load_recipe("no-such-recipe")


def test_group_sizes_that_do_not_divide_are_ruled_out(tiny_checkpoint):
    # FFN width 96: down_proj's input takes group 32 only; 80 takes none (stays float).
    for width, allowed in ((96, {32}), (80, set())):
        src = tiny_checkpoint("qwen3", tokenizer="small", overrides={"intermediate_size": width})
        ckpt = open_checkpoint(src)
        name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
        manifest = analyze_checkpoint(src, progress=False)
        for recipe in ("budget", "uniform-4bit", "swan-thresholds", "mixed-4-6"):
            plan = build_plan(manifest, name_map, load_recipe(recipe), 6.0
                              if recipe == "budget" else None)
            d = plan.decisions["model.layers.0.mlp.down_proj"]
            if allowed:
                assert d.quantized and d.group_size in allowed, recipe
            else:
                assert not d.quantized and "80" in d.reason, recipe


def test_manifest_round_trip_keeps_the_plan(analysed, tmp_path):
    _, manifest, name_map = analysed
    manifest.save(tmp_path / "m.json")
    again = Manifest.load(tmp_path / "m.json")
    a = build_plan(manifest, name_map, load_recipe("budget"))
    b = build_plan(again, name_map, load_recipe("budget"))
    assert a.decisions == b.decisions

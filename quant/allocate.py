"""Bits and group size per quantizable MLX module: manifest + rules + recipe -> Plan.

The unit of decision is an MLX module (what mlx_lm quantizes): a stack of
per-expert HF tensors is one unit, a split gate_up_proj gives two. Each unit
carries, from the manifest, its tensor class, composite SWAN score and the
measured relative error of every candidate (bits, group size); a stack's figures
are the parameter-weighted means of its experts'.

Budget mode minimises a predicted loss subject to sum_m params_m * bpw(candidate)
<= budget, exactly (knapsack.py). With the output objective (the default; needs a
sensitivity.Sensitivity) the loss of a candidate is its predicted KL,
class_gain[class_m] * E||(W - W_hat) x||^2 measured with input moments. With the
weight objective (the earlier default, also used when no sensitivity is given)
it is  prior_m * rel_mse_m(candidate) * params_m, where
prior_m = class_prior[class] * exp(score_slope * (composite_m - median composite)).
Bits per weight count every stored parameter, float ones at 16 bits.

Rules, in every mode: tensors the analyzer keeps in float (norms, biases, 1-D,
conv and linear-attention state) stay float; a group size that does not divide
a module's input is never used, and a module no group size fits stays float with
that reason in the plan; routers and shared-expert gates get >= 8 bits; tiny
tensors respect the manifest's min_bits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import knapsack
from . import settings as setting_mod
from .manifest import Manifest, TensorRecord
from .mlx_names import NameMap
from .plan import FLOAT_BITS, Decision, Plan
from .recipe import Recipe, load_recipe
from .sensitivity import Sensitivity

Setting = setting_mod.Setting  # (bits, group_size) or (bits, group_size, mode)


class AllocationError(ValueError):
    """Manifest, checkpoint and recipe do not fit together; one line for the user."""


@dataclass(frozen=True)
class Unit:
    module: str
    params: int
    in_dim: int
    tensor_class: str
    records: tuple[TensorRecord, ...]
    errors: dict[Setting, float] = field(default_factory=dict)  # relative MSE (affine)
    composite: float = 0.5
    min_bits: int = 2
    float_reason: str | None = None  # set when the module must stay in float


def build_units(manifest: Manifest, name_map: NameMap, recipe: Recipe) -> list[Unit]:
    records = {r.name: r for r in manifest.tensors}
    _check_coverage(manifest, name_map)
    units = []
    for t in name_map.quantizable():
        missing = [s for s in t.sources if s not in records]
        if missing:
            raise AllocationError(f"the manifest has no entry for {missing[0]}; "
                                  "was it made from another checkpoint?")
        recs = tuple(records[s] for s in t.sources)
        units.append(_unit(t.module, int(np.prod(t.shape)), t.shape[-1], recs, recipe))
    return units


def build_plan(
    manifest: Manifest, name_map: NameMap, recipe: Recipe, target_bpw: float | None = None,
    tied_embeddings: bool = False, sensitivity: Sensitivity | None = None,
    mode_errors: dict[str, dict[Setting, float]] | None = None,
) -> Plan:
    """sensitivity: predicted output errors and class gains; the budget recipe's
    output objective uses them (without, it falls back to the weight objective).
    mode_errors: module -> microscaling setting -> relative MSE (sensitivity.
    relative_mode_errors), what the weight objective needs for non-affine modes."""
    units = build_units(manifest, name_map, recipe)
    if mode_errors:
        units = [replace(u, errors={**u.errors, **mode_errors.get(u.module, {})}) for u in units]
    float_params = sum(int(np.prod(t.shape)) for t in name_map.floats())
    if recipe.mode == "budget":
        target = target_bpw if target_bpw is not None else recipe.budget.target_bpw
        if recipe.budget.objective != "output":
            sensitivity = None
        decisions = _budget(units, recipe, target, float_params, tied_embeddings, sensitivity)
    elif recipe.mode == "classes":
        floors = _classes(units, recipe)
        target, decisions = target_bpw, floors
        if target_bpw is not None:  # the recipe is a floor; the budget adds bits
            if recipe.budget.objective != "output":
                sensitivity = None
            decisions = _budget(units, recipe, target_bpw, float_params, tied_embeddings,
                                sensitivity, floors)
    elif recipe.mode == "thresholds":
        target, decisions = None, _thresholds(units, recipe)
    else:
        target, decisions = None, _fixed(units, recipe)
    return Plan(recipe=recipe.name, target_bpw=target, decisions=decisions,
                float_params=float_params, dropped=list(name_map.dropped))


def plan_from_manifest_file(
    manifest_path: str | Path, name_map: NameMap, recipe: str | Recipe = "budget",
    target_bpw: float | None = None, tied_embeddings: bool = False,
) -> Plan:
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return build_plan(Manifest.load(manifest_path), name_map, recipe, target_bpw,
                      tied_embeddings)


def uniform_plan(name_map: NameMap, bits: int, group_size: int) -> Plan:
    """Every quantizable module at (bits, group_size), no manifest needed (tests,
    baselines); a module whose input that group size does not divide stays float."""
    decisions = {}
    for t in name_map.quantizable():
        fits = t.shape[-1] % group_size == 0
        decisions[t.module] = Decision(
            module=t.module, params=int(np.prod(t.shape)), in_dim=t.shape[-1],
            bits=bits if fits else None, group_size=group_size if fits else None,
            reason="uniform" if fits else f"no group size divides the input {t.shape[-1]}",
        )
    return Plan(recipe=f"uniform-{bits}bit-g{group_size}", decisions=decisions,
                float_params=sum(int(np.prod(t.shape)) for t in name_map.floats()),
                dropped=list(name_map.dropped))


def _check_coverage(manifest: Manifest, name_map: NameMap) -> None:
    """Every manifest entry must feed an MLX parameter or be one mlx_lm drops."""
    known = {s for t in name_map.tensors for s in t.sources} | set(name_map.dropped)
    for record in manifest.tensors:
        if record.name not in known:
            raise AllocationError(f"manifest entry {record.name} maps to no MLX module")


def _unit(module: str, params: int, in_dim: int, recs: tuple[TensorRecord, ...],
          recipe: Recipe) -> Unit:
    tensor_class = recs[0].tensor_class
    min_bits = max([r.min_bits or 2 for r in recs] + [recipe.rules.min_bits.get(tensor_class, 2)])
    base = dict(module=module, params=params, in_dim=in_dim, tensor_class=tensor_class,
                records=recs, min_bits=min_bits)
    kept = [r for r in recs if not r.quantizable]
    if kept:
        return Unit(**base, float_reason=kept[0].reason or "kept in float by the analyzer")
    weights = np.array([r.params for r in recs], dtype=np.float64)
    per_record = [{(c.bits, c.group_size): c.rel_rms_error**2 for c in r.candidates}
                  for r in recs]
    settings = set.intersection(*(set(p) for p in per_record))
    errors = {
        s: float(np.dot(weights, [p[s] for p in per_record]) / weights.sum())
        for s in sorted(settings) if in_dim % s[1] == 0 and s[0] >= min_bits
    }
    composite = float(np.dot(weights, [r.composite or 0.0 for r in recs]) / weights.sum())
    if not errors:
        return Unit(**base, composite=composite,
                    float_reason=f"no candidate with >= {min_bits} bits divides input {in_dim}")
    return Unit(**base, errors=errors, composite=composite)


def _float_decision(u: Unit, reason: str) -> Decision:
    return Decision(module=u.module, params=u.params, in_dim=u.in_dim,
                    tensor_class=u.tensor_class, reason=reason)


def _decision(u: Unit, setting: Setting, reason: str) -> Decision:
    return Decision(module=u.module, params=u.params, in_dim=u.in_dim, bits=setting[0],
                    group_size=setting[1], mode=setting_mod.mode_of(setting),
                    tensor_class=u.tensor_class, reason=reason)


def prior(u: Unit, recipe: Recipe, median: float, tied_embeddings: bool) -> float:
    classes = recipe.budget.class_prior
    base = classes.get(u.tensor_class, recipe.budget.default_prior)
    if tied_embeddings and u.tensor_class == "embedding":  # it is the output head too
        base = max(base, classes.get("lm_head", recipe.budget.default_prior))
    return base * math.exp(recipe.budget.score_slope * (u.composite - median))


def budget_settings(units: list[Unit], recipe: Recipe) -> dict[str, list[Setting]]:
    """The candidates the budget recipe may choose from, per module left to choose."""
    out = {}
    b = recipe.budget
    for u in units:
        if u.float_reason:
            continue
        affine = [s for s in u.errors if setting_mod.mode_of(s) == "affine"]
        allowed = [s for s in affine if s[0] in b.bits and s[1] in b.group_sizes
                   and "affine" in b.modes]
        allowed += setting_mod.float_mode_settings(b.modes, u.in_dim, u.min_bits)
        out[u.module] = allowed or affine  # a rule (min bits) beats the recipe's list
    return out


def _budget(units: list[Unit], recipe: Recipe, target: float, float_params: int,
            tied: bool, sensitivity: Sensitivity | None = None,
            floors: dict[str, Decision] | None = None) -> dict[str, Decision]:
    """floors: per module the least it may get (a classes recipe's decisions): affine
    ones may only gain bits, float and mxfp ones are kept as they are."""
    floors = floors or {}
    decisions = {u.module: floors.get(u.module) or _float_decision(u, u.float_reason)
                 for u in units if u.float_reason}
    candidates = {}
    allowed_of = budget_settings(units, recipe)
    for u in units:
        if u.float_reason:
            continue
        floor = floors.get(u.module)
        allowed = allowed_of[u.module]
        if floor is not None:
            allowed = _above(floor, u, allowed) if floor.quantized and floor.mode == "affine" \
                else []
        if sensitivity is not None:
            if u.module not in sensitivity.errors:
                raise AllocationError(f"the sensitivity has no entry for {u.module}")
            allowed = [s for s in allowed if s in sensitivity.errors[u.module]]
        if allowed:
            candidates[u.module] = allowed
        elif floor is not None:  # nothing to choose: the recipe's decision stands
            decisions[u.module] = floor
        else:
            raise AllocationError(f"no candidate setting for {u.module}")
    live = [u for u in units if u.module in candidates]
    total = float_params + sum(u.params for u in units)
    fixed_bits = FLOAT_BITS * float_params + sum(d.params * d.bpw for d in decisions.values())
    median = float(np.median([u.composite for u in live])) if live else 0.0
    options = []
    for u in live:
        allowed = candidates[u.module]
        if sensitivity is not None:
            swan = math.exp(recipe.budget.output_score_slope * (u.composite - median))
            losses = [swan * sensitivity.loss(u.module, u.tensor_class, s) for s in allowed]
        else:
            missing = [s for s in allowed if s not in u.errors]
            if missing:
                raise AllocationError(f"no weight error measured for {u.module} at "
                                      f"{setting_mod.label(missing[0])}")
            p = prior(u, recipe, median, tied)
            losses = [p * u.errors[s] * u.params for s in allowed]
        options.append([knapsack.Option(u.params * setting_mod.bpw(s), loss)
                        for s, loss in zip(allowed, losses, strict=True)])
    try:
        chosen = knapsack.solve(options, target * total - fixed_bits)
    except knapsack.BudgetError:
        floor = (fixed_bits + sum(min(o.cost for o in opts) for opts in options)) / total
        what = f"{recipe.name}'s own" if floors else "the smallest possible"
        raise AllocationError(f"target {target} bpw is below {what} "
                              f"{floor:.3f} bpw for this model") from None
    why = "budget, weight error"
    if sensitivity is not None:  # "imatrix": priors as gains, no KL calibration (objective.py)
        why = ("budget, imatrix-weighted output error" if sensitivity.moments_source == "imatrix"
               else "budget, predicted KL")
    for u, opts, i in zip(live, options, chosen, strict=True):
        setting = candidates[u.module][i]
        reason = f"{why}: loss {opts[i].loss:.3g}"
        if u.module in floors:
            floor = floors[u.module]
            reason = (floor.reason if setting == (floor.bits, floor.group_size)
                      else f"{floor.reason}; {reason}")
        decisions[u.module] = _decision(u, setting, reason)
    return dict(sorted(decisions.items()))


def _above(floor: Decision, u: Unit, allowed: list[Setting]) -> list[Setting]:
    """Measured candidates with at least the floor's bits and bits per weight, the
    floor's own setting among them (the analyzer measures every MLX setting)."""
    own = (floor.bits, floor.group_size)
    up = {s for s in allowed if s[0] >= own[0] and setting_mod.bpw(s) >= floor.bpw}
    return sorted((up | {own}) & set(u.errors))


def _classes(units: list[Unit], recipe: Recipe) -> dict[str, Decision]:
    from .class_rules import class_decisions

    decisions = class_decisions(
        [(u.module, u.params, u.in_dim, u.tensor_class) for u in units], recipe)
    for u in units:
        d = decisions[u.module]
        if u.float_reason:
            decisions[u.module] = _float_decision(u, u.float_reason)
        elif d.quantized and d.mode == "affine" and d.bits < u.min_bits:
            decisions[u.module] = d.model_copy(update={
                "bits": u.min_bits, "reason": f"{d.reason}; raised to {u.min_bits} bits by rule"})
    return dict(sorted(decisions.items()))


def _first_group(u: Unit, preference: list[int]) -> int | None:
    return next((g for g in preference if u.in_dim % g == 0), None)


def _fixed_setting(u: Unit, bits: int | None, preference: list[int], why: str) -> Decision:
    """A decision for a fixed bits choice (None = float), honouring the rules."""
    if u.float_reason:
        return _float_decision(u, u.float_reason)
    if bits is None:
        return _float_decision(u, why)
    group = _first_group(u, preference)
    if group is None:
        return _float_decision(u, f"no group size of {preference} divides input {u.in_dim}")
    if bits < u.min_bits:
        bits, why = u.min_bits, f"{why}; raised to {u.min_bits} bits by rule"
    return _decision(u, (bits, group), why if group == preference[0]
                     else f"{why}; group {group} (group {preference[0]} does not divide)")


def _thresholds(units: list[Unit], recipe: Recipe) -> dict[str, Decision]:
    from .scoring import load_config, score

    config = load_config(recipe.thresholds.scoring)
    table = config.thresholds
    if not {"bits16", "bits8", "bits2"} <= set(table):
        raise AllocationError(f"scoring preset {config.name} has no bits16/bits8/bits2 thresholds")
    decisions = {}
    for u in units:
        if u.float_reason:
            decisions[u.module] = _float_decision(u, u.float_reason)
            continue
        weights = [r.params for r in u.records]
        composites = [score(r.metrics.spectral_concentration, r.metrics.excess_kurtosis,
                            r.metrics.noise_amplification, r.metrics.rel_rms_error, config)[1]
                      for r in u.records]
        c = float(np.average(composites, weights=weights))
        bits = (None if c >= table["bits16"] else 8 if c >= table["bits8"]
                else 2 if c < table["bits2"] else 4)
        why = f"thresholds: composite {c:.3f} -> {bits or 16} bits"
        decisions[u.module] = _fixed_setting(u, bits, recipe.thresholds.group_sizes, why)
    return dict(sorted(decisions.items()))


def _layer_index(module: str) -> int | None:
    match = re.search(r"\.(\d+)\.", module)
    return int(match.group(1)) if match else None


def _fixed(units: list[Unit], recipe: Recipe) -> dict[str, Decision]:
    fixed = recipe.fixed
    layers = {i for u in units if (i := _layer_index(u.module)) is not None}
    n = max(layers) + 1 if layers else 1
    decisions = {}
    for u in units:
        bits, why = fixed.bits, recipe.mode
        if recipe.mode == "mixed":
            role = u.module.rsplit(".", 1)[-1]
            i = _layer_index(u.module) or 0
            # mlx_lm's mixed_4_6 rule (after llama.cpp's Q4_K_M): more bits in the first
            # and last eighth of the layers and every third layer between.
            more = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
            if role in fixed.always_high_roles or (role in fixed.high_roles and more):
                bits, why = fixed.high_bits, "mixed: high"
        decisions[u.module] = _fixed_setting(u, bits, fixed.group_sizes, why)
    return dict(sorted(decisions.items()))

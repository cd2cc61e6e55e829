"""Allocation recipes: TOML files in configs/ named recipe-<name>.toml (or any path).

mode = "budget"      choose per module the candidate minimising predicted loss under
                     a bits-per-weight budget (allocate.py, knapsack.py)
mode = "thresholds"  the SWAN reference: composite score thresholds -> 16/8/4/2 bits
mode = "uniform"     one setting everywhere (mlx_lm.convert -q)
mode = "mixed"       mlx_lm's mixed_4_6 rule: v_proj/down_proj of some layers and
                     lm_head get more bits
mode = "classes"     a table of rules by tensor class and role, bits as offsets of a
                     base width d (--q-bits) or fixed, affine or mxfp modes
                     (class_rules.py; the unsloth recipes). With a --target-bpw it is
                     a floor: the budget may add bits where they buy the most.
[rules] hold in every mode.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from .affine import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .plan import Mode

DEFAULT_RECIPE = "budget"
DEFAULT_TARGET_BPW = 4.5


class RecipeError(ValueError):
    """A recipe that cannot be used; one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rules(_Strict):
    # Classes (names.TensorClass values) whose modules get at least this many bits.
    # "router" covers MoE routers (mlp.gate) and shared-expert gates.
    min_bits: dict[str, int] = {"router": 8}


class Budget(_Strict):
    target_bpw: float = DEFAULT_TARGET_BPW
    # "output": predicted KL from input moments and class gains (sensitivity.py);
    # "weight": the earlier objective, prior x relative weight MSE x parameters.
    objective: Literal["output", "weight"] = "output"
    bits: list[int] = list(SUPPORTED_BITS)
    group_sizes: list[int] = list(SUPPORTED_GROUP_SIZES)
    # MLX quantization modes the budget may choose: affine (bits x group_sizes above)
    # and the microscaling formats mxfp4 (4.25 bpw), nvfp4 (4.5), mxfp8 (8.25).
    modes: list[str] = ["affine"]
    # Sensitivity prior = class_prior[class] * exp(score_slope * (composite - median)).
    score_slope: float = 4.0
    # Output objective: predicted KL x exp(output_score_slope * (composite - median)).
    # 0 by default: on three models the SWAN composite (or any one of its metrics) on
    # top of the measured output error did not lower KL (bench/quality.py's ablation).
    output_score_slope: float = 0.0
    default_prior: float = 1.0
    class_prior: dict[str, float] = {}

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        if not v or set(v) - set(SUPPORTED_BITS):
            raise ValueError(f"bits must be a non-empty subset of {SUPPORTED_BITS}")
        return sorted(set(v))

    @field_validator("modes")
    @classmethod
    def _modes(cls, v: list[str]) -> list[str]:
        known = ("affine", "mxfp4", "mxfp8", "nvfp4")
        if not v or set(v) - set(known):
            raise ValueError(f"modes must be a non-empty subset of {list(known)}")
        return [m for m in known if m in v]

    @field_validator("group_sizes")
    @classmethod
    def _groups(cls, v: list[int]) -> list[int]:
        if not v or set(v) - set(SUPPORTED_GROUP_SIZES):
            raise ValueError(f"group_sizes must be a non-empty subset of {SUPPORTED_GROUP_SIZES}")
        return sorted(set(v))


class Thresholds(_Strict):
    # The analysis preset whose score normalisation and [thresholds] table are used:
    # the composite is recomputed from the manifest's raw metrics with it.
    scoring: str = "swan-reference-v2"
    group_sizes: list[int] = [64, 32, 128]  # preference; the first that divides the input


class Fixed(_Strict):
    """uniform and mixed modes."""

    bits: int = 4
    high_bits: int = 6  # mixed only
    group_sizes: list[int] = [64, 32, 128]  # preference; the first that divides the input
    high_roles: list[str] = ["v_proj", "down_proj"]  # mixed: in mlx_lm's "more bits" layers
    always_high_roles: list[str] = ["lm_head"]  # mixed: everywhere


class ClassRule(_Strict):
    """One line of a classes recipe; the first rule that selects a module decides it."""

    # "class" or "class:role": a names.TensorClass value, optionally with the MLX
    # module's last name part (expert:down_proj, linear_attention:in_proj_a).
    select: list[str]
    bits: int | str  # 8, "d", "d+2" (d = the recipe's base bits), or "float"
    group_size: int | None = None  # None: the recipe's base group size
    mode: Mode = "affine"  # mxfp4 / mxfp8 / nvfp4 fix their own bits and group size
    layers: Literal["all", "last", "rest"] = "all"  # last: the last `last_layers` layers

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int | str) -> int | str:
        if isinstance(v, str) and v != "float" and not re.fullmatch(r"d(\+\d+)?", v):
            raise ValueError(f"bits must be an int, 'd', 'd+N' or 'float', got {v!r}")
        return v


class Classes(_Strict):
    bits: int = 4  # d: --q-bits
    group_size: int = 64  # g: --q-group-size
    last_layers: int = 8  # what "last" means in a rule's layers
    rules: list[ClassRule] = []

    @field_validator("bits")
    @classmethod
    def _base_bits(cls, v: int) -> int:
        if v not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _base_group(cls, v: int) -> int:
        if v not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {v}")
        return v


class Recipe(_Strict):
    name: str
    description: str = ""
    mode: Literal["budget", "thresholds", "uniform", "mixed", "classes"]
    rules: Rules = Rules()
    budget: Budget = Budget()
    thresholds: Thresholds = Thresholds()
    fixed: Fixed = Fixed()
    classes: Classes = Classes()


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A TOML path as given, or the bundled configs/recipe-<name>.toml."""
    from swan_serve.configs import CONFIG_DIR

    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / f"recipe-{str(name_or_path).removesuffix('.toml')}.toml"
    if bundled.is_file():
        return bundled
    known = sorted(p.stem.removeprefix("recipe-") for p in CONFIG_DIR.glob("recipe-*.toml"))
    raise RecipeError(f"no recipe {str(name_or_path)!r}; bundled recipes: {', '.join(known)}")


def load_recipe(name_or_path: str | os.PathLike = DEFAULT_RECIPE) -> Recipe:
    from swan_serve.configs import load_toml_as

    return load_toml_as(recipe_path(name_or_path), Recipe, RecipeError, "recipe")


def with_base_bits(recipe: Recipe, bits: int | None, group_size: int | None) -> Recipe:
    """The recipe with --q-bits / --q-group-size applied (classes recipes only)."""
    if bits is None and group_size is None:
        return recipe
    if recipe.mode != "classes":
        raise RecipeError(f"--q-bits and --q-group-size apply to class-rule recipes "
                          f"(unsloth, unsloth-mxfp); {recipe.name} is {recipe.mode}")
    if bits is not None and bits not in SUPPORTED_BITS:
        raise RecipeError(f"--q-bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, "
                          f"got {bits}")
    if group_size is not None and group_size not in SUPPORTED_GROUP_SIZES:
        raise RecipeError(f"--q-group-size must be one of "
                          f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}, got {group_size}")
    update = {k: v for k, v in (("bits", bits), ("group_size", group_size)) if v is not None}
    return recipe.model_copy(update={"classes": recipe.classes.model_copy(update=update)})

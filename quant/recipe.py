"""Allocation recipes: TOML files in configs/ named recipe-<name>.toml (or any path).

mode = "budget"      choose per module the candidate minimising predicted loss under
                     a bits-per-weight budget (allocate.py, knapsack.py)
mode = "thresholds"  the SWAN reference: composite score thresholds -> 16/8/4/2 bits
mode = "uniform"     one setting everywhere (mlx_lm.convert -q)
mode = "mixed"       mlx_lm's mixed_4_6 rule: v_proj/down_proj of some layers and
                     lm_head get more bits
[rules] hold in every mode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from .affine import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

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


class Recipe(_Strict):
    name: str
    description: str = ""
    mode: Literal["budget", "thresholds", "uniform", "mixed"]
    rules: Rules = Rules()
    budget: Budget = Budget()
    thresholds: Thresholds = Thresholds()
    fixed: Fixed = Fixed()


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

"""Analysis config (TOML presets under configs/) and the composite SWAN score.

Each metric x is mapped to a score in [0, 1]; the composite is the weighted mean
of the four scores (weights normalised to sum 1). Higher = more sensitive to
quantization = deserves more bits.

normalisation = "logistic" (default): the metric is first put on a scale where
equal steps mean equal multiplicative change, t = T(x):
    spectral:  t = logit((x - f) / (1 - f))   f = spectral_fraction, the floor of x
    kurtosis:  t = log(3 + x)                 log of the raw kurtosis m4 / m2^2
    noise:     t = log(x)
    error:     t = log(x)
then s = 1 / (1 + exp(-ln(81) * (t - mid) / (T(hi) - T(lo)))), mid = (T(lo) + T(hi)) / 2,
so the fixed bounds lo and hi (in metric units, from the TOML) land on 0.1 and 0.9,
and values beyond them still differ: s never reaches 0 or 1, whatever the model.
normalisation = "clip_linear" (the reference's): s = clip((x - lo) / (hi - lo), 0, 1),
which sends every tensor beyond `hi` to 1.0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from .affine import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .manifest import Scores

DEFAULT_PRESET = "swan-default"
METRICS = ("spectral", "kurtosis", "noise", "error")
_LN81 = math.log(81.0)


class ConfigError(Exception):
    """An analysis config that cannot be used; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReferenceCandidate(_Strict):
    bits: int = 4
    group_size: int = 64


class AnalysisSettings(_Strict):
    seed: int = 0
    bits: list[int] = list(SUPPORTED_BITS)
    group_sizes: list[int] = list(SUPPORTED_GROUP_SIZES)
    reference: ReferenceCandidate = ReferenceCandidate()
    error_sample_elements: int = 1 << 19  # per matrix (per analysed expert)
    probes: int = 32  # unit probe vectors for noise amplification
    spectral_fraction: float = 0.1
    spectral_block: int = 512  # smaller side of the sub-block used for the spectrum
    expert_sample: int = 16  # analyse all experts when E <= this, else a seeded sample
    tiny_params: int = 1 << 20  # tensors with fewer parameters never get 2 bits
    block_elements: int = 1 << 22  # elements per streamed row block
    workers: int = 2  # tensors analysed in parallel (does not change the result)

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        bad = sorted(set(v) - set(SUPPORTED_BITS))
        if bad or not v:
            raise ValueError(f"bits must be a non-empty subset of {SUPPORTED_BITS}")
        return sorted(set(v))

    @field_validator("group_sizes")
    @classmethod
    def _groups(cls, v: list[int]) -> list[int]:
        bad = sorted(set(v) - set(SUPPORTED_GROUP_SIZES))
        if bad or not v:
            raise ValueError(f"group_sizes must be a non-empty subset of {SUPPORTED_GROUP_SIZES}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _check(self) -> AnalysisSettings:
        if self.expert_sample < 8:
            raise ValueError("expert_sample must be at least 8")
        if not 0.0 < self.spectral_fraction < 1.0:
            raise ValueError("spectral_fraction must lie in (0, 1)")
        if min(self.probes, self.spectral_block, self.error_sample_elements, self.workers) < 1:
            raise ValueError("probes, spectral_block, error_sample_elements, workers must be >= 1")
        return self


class ScoreSettings(_Strict):
    normalisation: str = "logistic"
    weights: dict[str, float] = {"spectral": 0.3, "kurtosis": 0.2, "noise": 0.2, "error": 0.3}
    bounds: dict[str, tuple[float, float]] = {
        "spectral": (0.15, 0.8),
        "kurtosis": (0.0, 30.0),
        "noise": (0.03, 0.3),
        "error": (0.03, 0.3),
    }

    @model_validator(mode="after")
    def _check(self) -> ScoreSettings:
        if self.normalisation not in ("logistic", "clip_linear"):
            raise ValueError("normalisation must be 'logistic' or 'clip_linear'")
        for table in ("weights", "bounds"):
            keys = set(getattr(self, table))
            if keys != set(METRICS):
                raise ValueError(f"score.{table} needs exactly the keys {', '.join(METRICS)}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError("score weights must be >= 0 with a positive sum")
        for name, (lo, hi) in self.bounds.items():
            if not lo < hi:
                raise ValueError(f"score.bounds.{name}: lower bound must be below upper bound")
        return self


class AnalysisConfig(_Strict):
    name: str = DEFAULT_PRESET
    description: str = ""
    analysis: AnalysisSettings = AnalysisSettings()
    score: ScoreSettings = ScoreSettings()
    thresholds: dict[str, float] = {}  # optional bits -> composite thresholds, for allocators

    def as_dict(self) -> dict:
        """What defines the analysis (execution settings such as `workers` left out)."""
        return self.model_dump(mode="json", exclude={"analysis": {"workers"}})

    def digest(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def candidates(self) -> list[tuple[int, int]]:
        return [(b, g) for b in self.analysis.bits for g in self.analysis.group_sizes]


def load_config(name_or_path: str | os.PathLike | None = None) -> AnalysisConfig:
    """A bundled preset by name (default swan-default) or a TOML file by path."""
    from swan_serve.configs import load_toml_as, preset_path

    text_name = str(name_or_path) if name_or_path is not None else DEFAULT_PRESET
    path = Path(text_name)
    if not path.is_file():
        try:
            path = preset_path(text_name)
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
    return load_toml_as(path, AnalysisConfig, ConfigError, "config")


def _transform(metric: str, x: float, fraction: float) -> float:
    if metric == "spectral":
        u = min(max((x - fraction) / (1.0 - fraction), 1e-6), 1.0 - 1e-6)
        return math.log(u / (1.0 - u))
    if metric == "kurtosis":
        return math.log(max(3.0 + x, 1e-6))
    return math.log(max(x, 1e-12))


def normalise(metric: str, x: float, config: AnalysisConfig) -> float:
    lo, hi = config.score.bounds[metric]
    if config.score.normalisation == "clip_linear":
        return min(max((x - lo) / (hi - lo), 0.0), 1.0)
    fraction = config.analysis.spectral_fraction
    t_lo, t_hi = _transform(metric, lo, fraction), _transform(metric, hi, fraction)
    z = (_transform(metric, x, fraction) - 0.5 * (t_lo + t_hi)) / (t_hi - t_lo)
    return 1.0 / (1.0 + math.exp(-_LN81 * z))


def score(
    spectral: float, kurtosis: float, noise: float, error: float, config: AnalysisConfig
) -> tuple[Scores, float]:
    """(normalised scores, composite) for one tensor's four metrics."""
    values = {"spectral": spectral, "kurtosis": kurtosis, "noise": noise, "error": error}
    normalised = {m: normalise(m, values[m], config) for m in METRICS}
    weights = config.score.weights
    composite = sum(weights[m] * normalised[m] for m in METRICS) / sum(weights.values())
    return Scores(**normalised), composite

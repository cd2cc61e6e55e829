"""The analysis manifest: a versioned pydantic schema, written as deterministic JSON.

One TensorRecord per checkpoint tensor, sorted by name. Quantizable tensors carry
the four SWAN metrics (at the reference candidate for noise and error), their
normalised scores in [0, 1], the composite score (higher = more sensitive = needs
more bits) and the measured error of every allowed candidate (bits, group_size).
Floats are rounded to 6 significant digits when the record is built, and the
body has no timestamps, so the same checkpoint and config give the same bytes.

API:
    Manifest.save(path) (atomic: temp file + rename), Manifest.load(path),
    Manifest.to_json() -> str, Manifest.tensor(name) -> TensorRecord,
    Manifest.quantizable() -> list[TensorRecord]
    sig(x) -> float rounded to SIGNIFICANT_DIGITS
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

SCHEMA_VERSION = 1
SIGNIFICANT_DIGITS = 6


class ManifestError(Exception):
    """A manifest file that cannot be read; the message is one line."""


def sig(x: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """x rounded to `digits` significant digits (stable text in JSON)."""
    return float(f"{float(x):.{digits}g}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Candidate(_Model):
    bits: int
    group_size: int
    bpw: float  # bits + 32 / group_size: a 16-bit scale and bias per group
    rel_rms_error: float  # ||W_hat - W||_F / ||W||_F over the sampled rows
    noise_amplification: float  # median of ||E x|| / ||W x|| over the seeded unit probes


class Metrics(_Model):
    spectral_concentration: float  # energy share of the top 10% singular values
    excess_kurtosis: float  # population, all weights (all analysed experts pooled)
    noise_amplification: float  # at the reference candidate
    rel_rms_error: float  # at the reference candidate
    row_kurtosis_median: float  # diagnostic: excess kurtosis per sampled row
    row_kurtosis_max: float
    max_abs_z: float  # diagnostic: largest |w - mean| / std over all weights


class Scores(_Model):
    """Normalised metrics in [0, 1] (see configs/swan-default.toml)."""

    spectral: float
    kurtosis: float
    noise: float
    error: float


class Sample(_Model):
    """How much of the tensor each estimate saw."""

    error_rows: int  # rows (per analysed expert) used for candidate errors
    rows: int  # rows of the (per-expert) matrix
    spectral_block: tuple[int, int]  # sub-block used for the spectrum
    spectral_exact: bool  # True when the block is the whole matrix


class Spread(_Model):
    min: float
    mean: float
    max: float


class ExpertSpread(_Model):
    """Per-expert spread of a stacked [E, out, in] tensor (one decision for the stack)."""

    total: int
    analysed: list[int]  # expert indices, sorted
    spectral_concentration: Spread
    excess_kurtosis: Spread
    rel_rms_error: Spread  # at the reference candidate
    composite: Spread


class TensorRecord(_Model):
    name: str
    shape: list[int]
    dtype: str
    params: int
    tensor_class: str  # names.TensorClass value
    role: str | None = None
    quantizable: bool
    reason: str | None = None  # why it stays in float
    stack_group: str | None = None  # per-expert tensors that mlx_lm stacks together
    min_bits: int | None = None  # smallest bits the allocator may choose (tiny tensors: 3)
    metrics: Metrics | None = None
    scores: Scores | None = None
    composite: float | None = None
    candidates: list[Candidate] = []
    sample: Sample | None = None
    experts: ExpertSpread | None = None


class Source(_Model):
    model_dir: str  # directory name only: the manifest does not depend on where it lies
    model_type: str | None
    architectures: list[str]
    fingerprint: str  # sha256 of shard names, sizes and headers
    files: list[str]
    total_bytes: int
    tensor_count: int


class Summary(_Model):
    quantizable: int
    kept_float: int
    quantizable_params: int
    float_params: int
    composite_quantiles: dict[str, float]  # min, p10, p50, p90, max


class Manifest(_Model):
    schema_version: int = SCHEMA_VERSION
    analyzer_version: str
    source: Source
    config: dict  # the analysis config as parsed from TOML
    config_hash: str  # sha256 of the canonical JSON of `config`
    summary: Summary
    tensors: list[TensorRecord]

    def to_json(self) -> str:
        return self.model_dump_json(indent=1) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temp file in the same directory, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path} is not JSON: {exc}") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{path} has manifest schema {version}; this swan-quant reads schema "
                f"{SCHEMA_VERSION}"
            )
        try:
            manifest = cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = f"{path} is not a valid manifest: {where}: {first['msg']}"
            raise ManifestError(message) from None
        return manifest

    def tensor(self, name: str) -> TensorRecord:
        for record in self.tensors:
            if record.name == name:
                return record
        raise KeyError(f"no tensor named {name!r} in the manifest")

    def quantizable(self) -> list[TensorRecord]:
        return [t for t in self.tensors if t.quantizable]

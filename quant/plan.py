"""The quantization plan: one decision per quantizable MLX module, JSON in and out.

The allocator writes it, the converter follows it, and it is saved beside the
converted checkpoint (swan-plan.json) so a user can see why each tensor got
its bits. Bits per weight always count scale and bias overhead (b + 32/g with
16-bit scale and bias; b + 8/g for the microscaling modes' 8-bit scale) and count
every float (unquantized) weight at 16 bits, over every parameter the MLX
checkpoint stores; the converter writes exactly those widths (convert.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from . import settings

PLAN_VERSION = 1
FLOAT_BITS = 16.0  # what an unquantized weight counts for in bpw figures
PLAN_FILE = "swan-plan.json"
# MLX quantization modes: affine (codes + scale + bias per group) and the
# microscaling float formats (FP4/FP8 codes + one 8-bit scale per group, no bias).
Mode = Literal["affine", "mxfp4", "mxfp8", "nvfp4"]
_DERIVED = ("achieved_bpw", "total_params", "settings")  # written for readers, not read back


class Decision(BaseModel):
    """What happens to one quantizable module's weight."""

    model_config = ConfigDict(extra="forbid")

    module: str  # MLX module path, e.g. "model.layers.3.mlp.down_proj"
    params: int  # weights in the module's weight tensor (all experts)
    in_dim: int  # input dimension (the axis groups run along)
    bits: int | None = None  # None: kept in float
    group_size: int | None = None
    mode: Mode = "affine"
    tensor_class: str = ""  # class from the manifest (attention_q, mlp_down, embedding, ...)
    reason: str = ""  # "budget", "rule: router >= 8 bits", "recipe", ...

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def bpw(self) -> float:
        if self.bits is None or self.group_size is None:
            return FLOAT_BITS
        return settings.bpw(settings.make(self.bits, self.group_size, self.mode))


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = PLAN_VERSION
    recipe: str  # "budget", "swan-thresholds", "uniform", a TOML path ...
    target_bpw: float | None = None
    decisions: dict[str, Decision]  # keyed by module path
    float_params: int = 0  # parameters that are not weights of quantizable modules
    dropped: list[str] = Field(default_factory=list)  # HF tensors mlx_lm's sanitize drops

    @property
    def total_params(self) -> int:
        return self.float_params + sum(d.params for d in self.decisions.values())

    @property
    def total_bits(self) -> float:
        quant = sum(d.params * d.bpw for d in self.decisions.values())
        return quant + self.float_params * FLOAT_BITS

    @property
    def achieved_bpw(self) -> float:
        total = self.total_params
        return self.total_bits / total if total else 0.0

    def summary(self) -> dict[str, int]:
        """Weights per (bits, group) setting of the quantizable modules."""
        counts: dict[str, int] = {}
        for d in self.decisions.values():
            label = f"{d.bits}b/g{d.group_size}" if d.quantized else "float"
            if d.quantized and d.mode != "affine":
                label = d.mode
            counts[label] = counts.get(label, 0) + d.params
        return dict(sorted(counts.items()))

    def save(self, path: str | Path) -> None:
        """JSON with the derived figures first, for people reading the file."""
        data = {"achieved_bpw": round(self.achieved_bpw, 6), "total_params": self.total_params,
                "settings": self.summary(), **self.model_dump(mode="json")}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        data = json.loads(Path(path).read_text())
        for derived in _DERIVED:
            data.pop(derived, None)
        return cls.model_validate(data)

"""`swan-quant validate QUANT --reference REF`: per-tensor cosine of dequantized weights.

Every MLX parameter present on both sides is streamed a row block at a time (one
expert slice of a stacked expert tensor at most; validate_sources.py) and its cosine
similarity accumulated in float64: cos = <a, b> / (|a| |b|) over the whole tensor.
A tensor PASSes at cos >= threshold (0.995 by default). One that both sides keep in
float must be exactly equal (as float32): nothing should have touched it, and a small
change to a few values barely moves a cosine (cos = 1.000000 there is not enough).
Tensors are grouped by class for the report (group_of); tensors found on
one side only are listed, not compared.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .progress import phase_progress
from .validate_sources import TensorView, open_side

DEFAULT_THRESHOLD = 0.995
_BLOCK_ELEMENTS = 1 << 20  # weights read per side at once (4 MB of float32)

# Report order of the groups.
GROUPS = (
    "attention", "linear_attn qkv", "linear_attn z", "linear_attn a", "linear_attn b",
    "linear_attn out", "linear_attn conv1d", "linear_attn A_log", "linear_attn dt_bias",
    "mlp", "routed experts", "shared experts", "routers", "embeddings", "lm_head", "norms",
    "other",
)
_LINEAR_ATTN = {
    "in_proj_qkv": "qkv", "in_proj_qkvz": "qkv", "in_proj_z": "z", "in_proj_a": "a",
    "in_proj_b": "b", "in_proj_ba": "a", "out_proj": "out", "conv1d": "conv1d",
    "A_log": "A_log", "dt_bias": "dt_bias",
}


def group_of(key: str) -> str:
    """The report group of an MLX parameter key."""
    parts = key.split(".")
    owner = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    if re.search(r"(^|\.)(vision_tower|visual|mtp)\.", key):
        return "other"
    if "norm" in owner.lower():
        return "norms"
    if "linear_attn" in parts and owner in _LINEAR_ATTN:
        return f"linear_attn {_LINEAR_ATTN[owner]}"
    if owner in ("embed_tokens", "wte", "tok_embeddings"):
        return "embeddings"
    if owner == "lm_head":
        return "lm_head"
    if owner == "shared_expert_gate" or (owner == "gate" and parts[-3:-2] == ["mlp"]):
        return "routers"
    if "switch_mlp" in parts or "experts" in parts:
        return "routed experts"
    if "shared_expert" in parts or "shared_experts" in parts:
        return "shared experts"
    if ("self_attn" in parts or "attn" in parts) and owner in ("q_proj", "k_proj", "v_proj",
                                                               "o_proj"):
        return "attention"
    if "mlp" in parts and owner in ("gate_proj", "up_proj", "down_proj"):
        return "mlp"
    return "other"


@dataclass
class TensorResult:
    key: str
    group: str
    cosine: float | None  # None: not comparable (shape mismatch)
    passed: bool
    quant: str  # how QUANT stores it
    reference: str  # how REF stores it
    both_float: bool
    max_abs_diff: float | None = None
    note: str = ""


@dataclass
class Report:
    quant: str
    reference: str
    threshold: float
    tensors: list[TensorResult] = field(default_factory=list)
    only_in_quant: list[str] = field(default_factory=list)
    only_in_reference: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[TensorResult]:
        return [t for t in self.tensors if not t.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def groups(self) -> list[dict]:
        """Per group: tensors, min and mean cosine, PASS/FAIL."""
        out = []
        for name in GROUPS:
            rows = [t for t in self.tensors if t.group == name]
            if not rows:
                continue
            cos = [t.cosine for t in rows if t.cosine is not None]
            out.append({"group": name, "tensors": len(rows),
                        "min_cosine": min(cos) if cos else None,
                        "mean_cosine": float(np.mean(cos)) if cos else None,
                        "passed": all(t.passed for t in rows)})
        return out

    def to_json(self) -> dict:
        return {"quant": self.quant, "reference": self.reference, "threshold": self.threshold,
                "passed": self.passed, "groups": self.groups(),
                "failed": [t.key for t in self.failed],
                "only_in_quant": self.only_in_quant, "only_in_reference": self.only_in_reference,
                "notes": self.notes, "tensors": [asdict(t) for t in self.tensors]}


def cosine(a: TensorView, b: TensorView, on_rows=None) -> tuple[float, float]:
    """(cosine, largest absolute difference) of two same-shape tensors, streamed a row
    block at a time."""
    dot = na = nb = diff = 0.0
    step = max(1, _BLOCK_ELEMENTS // max(1, a.cols))
    for slot in range(a.slots):
        for r0 in range(0, a.rows, step):
            r1 = min(a.rows, r0 + step)
            x = a.read(slot, r0, r1).astype(np.float64).ravel()
            y = b.read(slot, r0, r1).astype(np.float64).ravel()
            dot += float(x @ y)
            na += float(x @ x)
            nb += float(y @ y)
            diff = max(diff, float(np.max(np.abs(x - y), initial=0.0)))
            if on_rows is not None:
                on_rows(x.size)
    if na == 0.0 or nb == 0.0:
        return (1.0 if na == nb else 0.0), diff
    return dot / (na**0.5 * nb**0.5), diff


def compare(q: TensorView, r: TensorView, threshold: float, on_rows=None) -> TensorResult:
    both_float = q.kept_float and r.kept_float
    base = dict(key=q.key, group=group_of(q.key), quant=q.storage, reference=r.storage,
                both_float=both_float)
    if q.shape != r.shape:
        return TensorResult(**base, cosine=None, passed=False,
                            note=f"shape {q.shape} against {r.shape}")
    cos, diff = cosine(q, r, on_rows)
    if both_float:
        return TensorResult(**base, cosine=cos, passed=diff == 0.0, max_abs_diff=diff,
                            note="" if diff == 0.0 else f"float on both sides, values differ "
                            f"by up to {diff:.3g}")
    return TensorResult(**base, cosine=cos, passed=cos >= threshold, max_abs_diff=diff)


def validate(quant: str | Path, reference: str | Path, threshold: float = DEFAULT_THRESHOLD,
             progress: bool = True) -> Report:
    """Compare every MLX parameter of QUANT with REF's."""
    from .folded import FOLDS_FILE

    _, q_views = open_side(quant)
    folds = Path(quant).expanduser() / FOLDS_FILE
    folds = folds if folds.is_file() else None
    r_kind, r_views = open_side(reference, folds=folds)
    notes = []
    if folds is not None:
        notes.append(f"QUANT was pre-scaled ({FOLDS_FILE}): " + (
            "the reference is read with the same factors folded in" if r_kind == "source"
            else "an MLX reference cannot be refolded, so rescaled tensors will differ"))
    report = Report(str(quant), str(reference), threshold, notes=notes,
                    only_in_quant=sorted(set(q_views) - set(r_views)),
                    only_in_reference=sorted(set(r_views) - set(q_views)))
    common = sorted(set(q_views) & set(r_views))
    total = sum(int(np.prod(q_views[k].shape)) for k in common)
    with phase_progress("validate", total, unit="w", enabled=progress) as bar:
        for key in common:
            report.tensors.append(compare(q_views[key], r_views[key], threshold, bar.update))
    return report


def _fmt(c: float | None) -> str:
    return "-" if c is None else f"{c:.6f}"


def format_report(report: Report) -> str:
    """The terminal table: per group, then the failing and one-side-only tensors."""
    lines = [*report.notes, f"{'group':<20} {'tensors':>7} {'min cos':>9} {'mean cos':>9}  result"]
    for g in report.groups():
        lines.append(f"{g['group']:<20} {g['tensors']:>7} {_fmt(g['min_cosine']):>9} "
                     f"{_fmt(g['mean_cosine']):>9}  {'PASS' if g['passed'] else 'FAIL'}")
    failed = report.failed
    if failed:
        lines.append(f"\n{len(failed)} tensor(s) FAIL (threshold {report.threshold}; "
                     "float on both sides must be equal):")
        for t in failed:
            note = f"  ({t.note})" if t.note else ""
            lines.append(f"  {t.key}  cos {_fmt(t.cosine)}  {t.quant} vs {t.reference}{note}")
    for title, keys in (("only in QUANT", report.only_in_quant),
                        ("only in the reference", report.only_in_reference)):
        if keys:
            lines.append(f"\n{len(keys)} tensor(s) {title} (not compared):")
            lines.extend(f"  {k}" for k in keys)
    verdict = "PASS" if report.passed else "FAIL"
    lines.append(f"\n{verdict}: {len(report.tensors) - len(failed)} of {len(report.tensors)} "
                 "tensors pass")
    return "\n".join(lines)


def write_json(report: Report, target: str) -> None:
    """--json FILE, or - for standard output."""
    text = json.dumps(report.to_json(), indent=1)
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text + "\n")

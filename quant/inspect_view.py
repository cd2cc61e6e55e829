"""Text summaries for `swan-quant inspect`: a manifest, an HF checkpoint, an MLX checkpoint."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from .manifest import Manifest, TensorRecord
from .names import classify
from .sources.checkpoint import open_checkpoint


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _row(record: TensorRecord) -> str:
    m = record.metrics
    assert m is not None
    return (
        f"  {record.composite:8.4f}  {record.tensor_class:<16} {m.spectral_concentration:7.4f} "
        f"{m.excess_kurtosis:9.3f} {m.rel_rms_error:8.4f}  {record.name}"
    )


def describe_manifest(path: Path, top: int = 10) -> str:
    manifest = Manifest.load(path)
    s, src = manifest.summary, manifest.source
    lines = [
        f"manifest {path} (schema {manifest.schema_version}, analyzer {manifest.analyzer_version})",
        f"model    {src.model_dir} ({src.model_type}), {src.tensor_count} tensors, "
        f"{_gb(src.total_bytes)} in {len(src.files)} file(s)",
        f"config   {manifest.config.get('name')} ({manifest.config_hash[:12]})",
        f"tensors  {s.quantizable} quantizable ({s.quantizable_params:,} params), "
        f"{s.kept_float} kept in float ({s.float_params:,} params)",
        "composite " + "  ".join(f"{k} {v}" for k, v in s.composite_quantiles.items()),
        "",
        "class              count    mean composite",
    ]
    by_class: dict[str, list[float]] = defaultdict(list)
    for t in manifest.quantizable():
        by_class[t.tensor_class].append(t.composite or 0.0)
    for name, values in sorted(by_class.items()):
        lines.append(f"  {name:<16} {len(values):6d}    {sum(values) / len(values):.4f}")
    ranked = sorted(manifest.quantizable(), key=lambda t: (-(t.composite or 0.0), t.name))
    header = "  composite class            spectral  kurtosis  err@ref  name"
    lines += ["", f"most sensitive {min(top, len(ranked))}:", header]
    lines += [_row(t) for t in ranked[:top]]
    lines += ["", f"least sensitive {min(top, len(ranked))}:", header]
    lines += [_row(t) for t in ranked[::-1][:top]]
    return "\n".join(lines)


def _describe_mlx(model_dir: Path, config: dict) -> str:
    quant = config["quantization"]
    default = (quant.get("bits"), quant.get("group_size"))
    per_module = {k: v for k, v in quant.items() if isinstance(v, dict)}
    settings = Counter((v.get("bits"), v.get("group_size")) for v in per_module.values())
    floats = sum(1 for v in quant.values() if v is False)
    lines = [
        f"MLX quantized checkpoint {model_dir} ({config.get('model_type')})",
        f"default  bits {default[0]} group {default[1]}",
        f"modules  {len(per_module)} with their own setting, {floats} kept in float",
    ]
    for (bits, group), count in sorted(settings.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        lines.append(f"  bits {bits} group {group}: {count} modules")
    return "\n".join(lines)


def describe_checkpoint(model_dir: Path) -> str:
    config_path = model_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if isinstance(config, dict) and isinstance(config.get("quantization"), dict):
            return _describe_mlx(model_dir, config)
    ckpt = open_checkpoint(model_dir)
    counts: Counter = Counter()
    params: Counter = Counter()
    dtypes = Counter(t.dtype for t in ckpt.tensors)
    for t in ckpt.tensors:
        cls = classify(t.name, t.shape)
        key = (cls.tensor_class.value, "quantizable" if cls.quantizable else "float")
        counts[key] += 1
        params[key] += t.numel
    lines = [
        f"checkpoint {model_dir} ({ckpt.config.get('model_type')}), {len(ckpt.tensors)} tensors "
        f"in {len(ckpt.files)} file(s), {_gb(sum(t.nbytes for t in ckpt.tensors))}",
        "dtypes   " + ", ".join(f"{d} x{n}" for d, n in sorted(dtypes.items())),
        "",
        "class            kind          count          params",
    ]
    for (name, kind), count in sorted(counts.items()):
        lines.append(f"  {name:<16} {kind:<11} {count:7d} {params[(name, kind)]:15,d}")
    return "\n".join(lines)

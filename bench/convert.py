"""Time and peak memory of a whole conversion (analyze -> allocate -> convert).

Target: the full-shape Qwen3-8B fixture (16.4 GB of bf16) converts in under
12 GB peak RSS on a 24 GB machine. Peak RSS is the kernel's high-water mark
(VmHWM) of this process, reset between stages where Linux allows it.

    python bench/convert.py                       # /tmp/swan-bench/qwen3-8b-full, 4.5 bpw
    python bench/convert.py MODEL --target-bpw 4.0 --out DIR
    python bench/convert.py MODEL --uniform 4     # skip analysis: uniform 4-bit g64
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = Path("/tmp/swan-bench/qwen3-8b-full")


def peak_rss_gb() -> float:
    """High-water mark of this process's resident set, in GB (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    import resource  # not Linux: ru_maxrss (bytes on macOS)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e9


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, help="output folder (default: a temp folder, removed)")
    parser.add_argument("--target-bpw", type=float, default=4.5)
    parser.add_argument("--uniform", type=int, metavar="BITS", help="uniform BITS at group 64")
    parser.add_argument("--manifest", type=Path, help="use this manifest instead of analysing")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"no model at {args.model} (write it with the fixture factory first)")
        return 1

    from swan_serve.quant import allocate
    from swan_serve.quant.convert import convert
    from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes
    from swan_serve.quant.sources.checkpoint import open_checkpoint

    rows = []
    size_gb = sum(p.stat().st_size for p in args.model.glob("*.safetensors")) / 1e9
    per_stage = reset_peak()
    ckpt = open_checkpoint(args.model)
    manifest_path = args.manifest
    if args.uniform is None and manifest_path is None:
        from swan_serve.quant.analyze import analyze_checkpoint

        start = time.perf_counter()
        manifest = analyze_checkpoint(args.model, progress=True)
        manifest_path = Path(tempfile.mkdtemp()) / "manifest.json"
        manifest.save(manifest_path)
        rows.append(("analyze", time.perf_counter() - start, peak_rss_gb()))
        per_stage and reset_peak()

    start = time.perf_counter()
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    if args.uniform is not None:
        plan = allocate.uniform_plan(name_map, args.uniform, 64)
    else:
        plan = allocate.plan_from_manifest_file(
            manifest_path, name_map, recipe="budget", target_bpw=args.target_bpw,
            tied_embeddings=bool(ckpt.config.get("tie_word_embeddings", False)),
        )
    rows.append(("allocate", time.perf_counter() - start, peak_rss_gb()))
    per_stage and reset_peak()

    out = args.out or Path(tempfile.mkdtemp(prefix="swan-bench-convert-")) / "model"
    start = time.perf_counter()
    result = convert(args.model, out, plan, manifest_path=manifest_path, force=True,
                     workers=args.workers)
    rows.append(("convert", time.perf_counter() - start, peak_rss_gb()))

    print(f"\nmodel {args.model} ({size_gb:.1f} GB of safetensors), recipe {plan.recipe}, "
          f"{plan.achieved_bpw:.3f} bpw (floats at 16 bits), output "
          f"{result.bytes_written / 1e9:.2f} GB")
    print(f"{'stage':10s} {'seconds':>9s} {'peak RSS GB':>12s}")
    for stage, seconds, peak in rows:
        print(f"{stage:10s} {seconds:9.1f} {peak:12.2f}")
    print(f"{'total':10s} {sum(r[1] for r in rows):9.1f} {max(r[2] for r in rows):12.2f}"
          + ("" if per_stage else "  (peaks are cumulative: no per-stage reset here)"))
    if args.out is None:
        shutil.rmtree(out.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

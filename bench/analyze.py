"""Speed and memory of `swan-quant analyze` (targets on a 2-core machine: the full-shape
Qwen3-8B, 16.4 GB of bf16, in under 3 minutes and under 3 GB peak RSS; a stacked
expert layer's peak RSS must not grow with the number of experts).

Each analysis runs as a child process (`python -m swan_serve.quant.cli analyze`),
so wall time, CPU time and peak RSS (the child's ru_maxrss) are those of the
real command. Missing checkpoints are written first with the fixture factory
into the cache folder (--cache, $SWAN_BENCH_DIR, default /tmp/swan-bench).

    python bench/analyze.py                       # dense 8B + stacked experts 64 / 512
    python bench/analyze.py --skip-moe            # only the dense 8B
    python bench/analyze.py --moe-hidden 2048     # smaller expert layers (less disk)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from swan_serve.quant.fixtures import write_checkpoint
from swan_serve.quant.fixtures.tokenizer import shared_dir
from swan_serve.quant.manifest import Manifest
from swan_serve.quant.scoring import load_config, score


def cache_root(arg: Path | None) -> Path:
    return arg or Path(os.environ.get("SWAN_BENCH_DIR", "/tmp/swan-bench"))


def dense_model(cache: Path) -> Path:
    path = cache / "qwen3-8b-full"
    if (path / "config.json").is_file():
        return path
    config = shared_dir() / "models" / "Qwen3-8B" / "config.json"
    if not config.is_file():
        sys.exit(f"bench: {path} is missing and {config} (needed to write it) is absent")
    print(f"writing the full-shape Qwen3-8B fixture into {path} (16.4 GB) ...", flush=True)
    return write_checkpoint(path, "qwen3", config=config, progress=True)


def moe_model(cache: Path, experts: int, hidden: int, intermediate: int) -> Path:
    """One Qwen3.5 decoder layer whose experts are stored stacked ([E, out, in])."""
    path = cache / f"qwen3_5_moe-1layer-e{experts}-h{hidden}-i{intermediate}"
    if (path / "config.json").is_file():
        return path
    print(f"writing a {experts}-expert stacked layer into {path} ...", flush=True)
    overrides = {
        "num_hidden_layers": 1,
        "num_experts": experts,
        "num_experts_per_tok": 8,
        "hidden_size": hidden,
        "moe_intermediate_size": intermediate,
        "shared_expert_intermediate_size": intermediate,
    }
    return write_checkpoint(
        path, "qwen3_5_moe", tokenizer="small", overrides=overrides, progress=True
    )


def run_analyze(model: Path, out: Path, extra: list[str]) -> dict:
    """Run the CLI in a child; return wall, cpu and peak RSS of that child."""
    command = [sys.executable, "-m", "swan_serve.quant.cli", "analyze", str(model),
               "-o", str(out), "--no-progress", *extra]
    return run_child(command)[0]


def run_child(command: list[str]) -> tuple[dict, str]:
    """Run a child to its end: ({wall_s, cpu_s, peak_rss_gb} of it, its stdout); a child
    that fails ends the bench with the tail of its stderr. bench/stream.py uses it too."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    stdout, stderr = child.communicate()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {' '.join(command[2:4])} failed: {stderr.decode().strip()[-2000:]}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    figures = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
               "peak_rss_gb": usage.ru_maxrss * scale / 1e9}
    return figures, stdout.decode().strip()


def composite_quantiles(manifest: Manifest, preset: str) -> list[float]:
    """Composite scores rescored under `preset` from the manifest's own metrics."""
    config = load_config(preset)
    values = [
        score(
            m.spectral_concentration,
            m.excess_kurtosis,
            m.noise_amplification,
            m.rel_rms_error,
            config,
        )[1]
        for m in (t.metrics for t in manifest.quantizable())
    ]
    return list(np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0]))


def bench_dense(cache: Path, workdir: Path) -> None:
    model = dense_model(cache)
    out = workdir / "dense.json"
    result = run_analyze(model, out, [])
    manifest = Manifest.load(out)
    size = manifest.source.total_bytes
    print("\n== dense: full-shape Qwen3-8B fixture ==")
    print(
        f"{'checkpoint':<12} {'tensors':>7} {'GB':>6} {'wall s':>7} {'MB/s':>6} "
        f"{'cpu s':>7} {'peak RSS GB':>11}"
    )
    print(
        f"{model.name:<12} {manifest.source.tensor_count:>7} {size / 1e9:>6.2f} "
        f"{result['wall_s']:>7.1f} {size / result['wall_s'] / 1e6:>6.0f} "
        f"{result['cpu_s']:>7.1f} {result['peak_rss_gb']:>11.2f}"
    )
    print("\ncomposite score of the quantizable tensors (min / p10 / median / p90 / max):")
    for preset in ("swan-default", "swan-reference-v2"):
        q = composite_quantiles(manifest, preset)
        print(
            f"  {preset:<18} "
            + " / ".join(f"{v:.3f}" for v in q)
            + f"   (p90 - p10 = {q[3] - q[1]:.3f})"
        )
    saturated = sum(1 for t in manifest.quantizable() if t.metrics.excess_kurtosis >= 10.0)
    print(
        f"  reference kurtosis map clip(k/10) is 1.0 for {saturated} of "
        f"{manifest.summary.quantizable} tensors"
    )


def bench_moe(cache: Path, workdir: Path, experts: list[int], hidden: int, inter: int) -> None:
    print(f"\n== stacked experts: one Qwen3.5 layer, hidden {hidden}, expert width {inter} ==")
    print(f"{'experts':>7} {'analysed':>8} {'stack GB':>8} {'wall s':>7} {'peak RSS GB':>11}")
    for count in experts:
        model = moe_model(cache, count, hidden, inter)
        for sample in sorted({16, count}):
            config = workdir / f"sample{sample}.toml"
            config.write_text(f'name = "bench"\n[analysis]\nexpert_sample = {sample}\n')
            out = workdir / f"moe{count}-{sample}.json"
            result = run_analyze(model, out, ["--config", str(config)])
            manifest = Manifest.load(out)
            stacks = [t for t in manifest.tensors if t.experts is not None]
            stack_bytes = sum(t.params for t in stacks) * 2
            analysed = len(stacks[0].experts.analysed)
            print(
                f"{count:>7} {analysed:>8} {stack_bytes / 1e9:>8.2f} {result['wall_s']:>7.1f} "
                f"{result['peak_rss_gb']:>11.2f}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="checkpoint cache folder")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--skip-moe", action="store_true")
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--moe-hidden", type=int, default=4096)
    parser.add_argument("--moe-intermediate", type=int, default=1024)
    args = parser.parse_args(argv)
    cache = cache_root(args.cache)
    with tempfile.TemporaryDirectory(prefix="swan-bench-analyze-") as tmp:
        if not args.skip_dense:
            bench_dense(cache, Path(tmp))
        if not args.skip_moe:
            bench_moe(cache, Path(tmp), args.experts, args.moe_hidden, args.moe_intermediate)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of the output objective's `measure`: streamed vs whole numpy model.

`objective.measure` runs the numpy model (self-generated text, input moments,
class calibration). Streamed (NpModel.stream, the default) it reads the
checkpoint a decoder layer at a time; whole (NpModel.load, the path before
streaming) it holds mlx_lm's loaded model plus a float32 numpy copy of every
weight. Each path runs `measure` in a child process, so wall time, CPU time and
peak RSS (the child's ru_maxrss) are those of that path alone; the manifest is
analysed first, in another child.

The model is the Qwen3-8B shape (hidden 4096, intermediate 12288, 151,936-token
vocabulary) cut to a few layers and with tied embeddings, written by the fixture
factory (random bf16 weights: the text it writes is noise, the cost is real):
2 layers are 2.0 GB on disk. Written into --cache ($SWAN_BENCH_DIR, default
/tmp/swan-bench) if missing.

    python bench/stream.py                    # 2 layers, both paths
    python bench/stream.py --paths stream --layers 3 --new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from analyze import run_child  # bench/analyze.py: a child's wall, CPU and peak RSS

from swan_serve.quant.fixtures import write_checkpoint
from swan_serve.quant.fixtures.tokenizer import shared_dir

_CHILD = """
import sys, time
from pathlib import Path
from swan_serve.quant import moments, objective
from swan_serve.quant.manifest import Manifest
from swan_serve.quant.npmodel import NpModel
from swan_serve.quant.recipe import load_recipe
src, manifest, path, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
phases, readings = [], [0.0]

def peak_gb():  # VmHWM, then reset it (Linux clear_refs 5) so each phase has its own;
    status = Path("/proc/self/status")  # the whole run's peak is the max of all readings
    if not status.is_file():
        return float("nan")
    kb = next(int(line.split()[1]) for line in status.read_text().splitlines()
              if line.startswith("VmHWM"))
    Path("/proc/self/clear_refs").write_text("5")
    readings.append(kb * 1024 / 1e9)
    return readings[-1]

def timed(module, name):
    inner = getattr(module, name)
    def wrapper(*args, **kwargs):
        peak_gb()
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        phases.append(f"{name} {time.perf_counter() - start:.0f}s {peak_gb():.2f}GB")
        return out
    setattr(module, name, wrapper)

for module, name in ((moments, "conversations"), (moments, "record"),
                     (objective, "candidate_errors"), (objective, "calibrate")):
    timed(module, name)
given = NpModel.load(src) if path == "whole" else None
sens, _ = objective.measure(src, Manifest.load(manifest), load_recipe("budget"),
                            options=moments.MomentOptions(max_new_tokens=tokens),
                            model_and_tokenizer=given)
peak_gb()
print(f"{max(readings):.2f}", ", ".join(phases))
"""


def model_dir(cache: Path, layers: int) -> Path:
    path = cache / f"qwen3-8b-shape-{layers}layers-tied"
    if (path / "config.json").is_file():
        return path
    config = shared_dir() / "models" / "Qwen3-8B" / "config.json"
    if not config.is_file():
        sys.exit(f"bench: {config} (the Qwen3-8B shape) is absent; set SWAN_SHARED_DIR")
    print(f"writing {path} ...", file=sys.stderr, flush=True)
    overrides = {"num_hidden_layers": layers, "tie_word_embeddings": True}
    return write_checkpoint(path, "qwen3", config=config, overrides=overrides, progress=True)


def layer_gb(config: dict) -> float:
    """float32 GB of one decoder layer's weights."""
    h, i = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    return 4 * (h * (2 * q + 2 * kv) + 3 * h * i) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--paths", default="stream,whole", help="stream, whole or both")
    parser.add_argument("--new-tokens", type=int, default=48,
                        help="decode steps of the self-generated text (measure's default 48)")
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("SWAN_BENCH_DIR", "/tmp/swan-bench")))
    args = parser.parse_args(argv)
    src = model_dir(args.cache, args.layers)
    config = json.loads((src / "config.json").read_text())
    size = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9
    with tempfile.TemporaryDirectory(prefix="swan-bench-stream-") as work:
        manifest = Path(work) / "manifest.json"
        run_child([sys.executable, "-m", "swan_serve.quant.cli", "analyze", str(src),
                   "-o", str(manifest), "--no-progress"])
        print(f"{src.name}: {size:.2f} GB bf16, one layer {layer_gb(config):.2f} GB float32, "
              f"{args.new_tokens} decode steps")
        print(f"{'path':<8} {'wall s':>7} {'cpu s':>7} {'peak RSS GB':>11}  "
              "phases: wall, peak RSS of each")
        for path in args.paths.split(","):
            figures, out = run_child([sys.executable, "-c", _CHILD, str(src), str(manifest),
                                     path, str(args.new_tokens)])
            peak, phases = out.splitlines()[-1].split(" ", 1)
            if peak != "nan":  # the resets hide earlier peaks from ru_maxrss
                figures["peak_rss_gb"] = float(peak)
            print(f"{path:<8} {figures['wall_s']:>7.1f} {figures['cpu_s']:>7.1f} "
                  f"{figures['peak_rss_gb']:>11.2f}  {phases}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Converting from GGUF against converting from safetensors: wall time and peak RSS.

The full-shape Qwen3-8B fixture (16.4 GB of bf16 safetensors, the fixture factory)
is also written as a BF16 GGUF split in 4 shards, straight from the same bytes
(llama.cpp's layout: same tensors, F32 norms). Each source is then converted in a
child process of its own, one after the other, with the same plan, and the table
gives each child's wall time and peak RSS (ru_maxrss from wait4). Target: the GGUF
route streams like the safetensors one, peak RSS under 1 GB.

The plan is uniform 4-bit g64 with round-to-nearest by default (the reading path
is what differs between the two routes; analysis and fitting are the same code on
the same numbers); --full runs the whole analyze -> allocate -> convert pipeline.
Writes ~33 GB of temp files under --dir (checks free space first) and deletes them.

    python bench/gguf.py [--dir /tmp/swan-bench-gguf] [--full] [--keep-files]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# This file is named gguf.py: run as a script, its folder comes first on sys.path and
# would shadow the `gguf` package that writes the fixture GGUF.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

NEEDED_GB = 45  # 16.4 safetensors + 16.4 GGUF + two converted outputs, with slack

CHILD = r"""
import sys, time
from pathlib import Path
from swan_serve.quant.allocate import uniform_plan
from swan_serve.quant.build import quantize_model
from swan_serve.quant.convert import convert
from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes
from swan_serve.quant.sources.checkpoint import open_checkpoint
source, out, full = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
start = time.perf_counter()
if source.endswith(".gguf"):
    from swan_serve.quant.sources.gguf_model import prepare_source
    source, _ = prepare_source(Path(source), out.parent / "gguf-sources")
print(f"opened in {time.perf_counter() - start:.1f} s", flush=True)
if full:
    quantize_model(Path(source), out, target_bpw=4.5, force=True)
else:
    ckpt = open_checkpoint(source)
    plan = uniform_plan(build_name_map(ckpt.config, checkpoint_shapes(ckpt)), 4, 64)
    convert(source, out, plan, method="rtn", force=True)
"""


def run_child(source: Path, out: Path, full: bool) -> tuple[float, float, str]:
    """(wall s, peak RSS GB, last output line) of one conversion in a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(out),
                             "1" if full else "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"conversion of {source} failed:\n" + "\n".join(lines[-20:]))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux
    opened = next((line for line in lines if line.startswith("opened in")), "")
    return wall, usage.ru_maxrss * scale / 1e9, opened


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/swan-bench-gguf"))
    parser.add_argument("--full", action="store_true", help="analyze + budget 4.5 bpw + fit")
    parser.add_argument("--keep-files", action="store_true", help="do not delete the fixtures")
    args = parser.parse_args(argv)

    from swan_serve.quant.fixtures import write_checkpoint
    from swan_serve.quant.fixtures.gguf_writer import write_gguf_raw
    from swan_serve.quant.fixtures.tokenizer import shared_dir

    config = shared_dir() / "models" / "Qwen3-8B" / "config.json"
    if not config.is_file():
        print(f"needs the real Qwen3-8B config at {config} (set SWAN_SHARED_DIR)")
        return 1
    args.dir.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(args.dir).free / 1e9
    if free_gb < NEEDED_GB:
        print(f"{args.dir} has {free_gb:.0f} GB free; this bench needs {NEEDED_GB} GB")
        return 1
    st_dir, gguf_dir = args.dir / "qwen3-8b-safetensors", args.dir / "qwen3-8b-gguf"
    try:
        if not (st_dir / "config.json").is_file():
            print(f"writing the full-shape Qwen3-8B fixture into {st_dir} ...", flush=True)
            write_checkpoint(st_dir, "qwen3", config=config, tokenizer="qwen3", progress=True)
        first = next(iter(sorted(gguf_dir.glob("*-00001-of-00004.gguf"))), None)
        if first is None:
            print(f"writing it as a 4-shard BF16 GGUF into {gguf_dir} ...", flush=True)
            first = write_gguf_raw(st_dir, gguf_dir / "Qwen3-8B-BF16.gguf", shards=4)
        sizes = {
            "safetensors": sum(p.stat().st_size for p in st_dir.glob("*.safetensors")),
            "GGUF, 4 shards": sum(p.stat().st_size for p in gguf_dir.glob("*.gguf")),
        }
        rows = []
        for label, source in (("safetensors", st_dir), ("GGUF, 4 shards", first)):
            out = args.dir / f"out-{label.split(',')[0].lower()}" / "model"
            print(f"converting {label} ...", flush=True)
            wall, peak, opened = run_child(source, out, args.full)
            rows.append((label, sizes[label] / 1e9, wall, peak, opened))
            shutil.rmtree(out.parent, ignore_errors=True)
    finally:
        if not args.keep_files:
            shutil.rmtree(args.dir, ignore_errors=True)
    plan = "analyze + budget 4.5 bpw + fit" if args.full else "uniform 4-bit g64, round-to-nearest"
    print(f"\nQwen3-8B full shape, bf16; plan: {plan}; one run each, same machine")
    print(f"| {'source':15s} | {'GB':>5s} | {'wall s':>7s} | {'peak RSS GB':>11s} | opening |")
    print(f"|{'-' * 17}|{'-' * 7}|{'-' * 9}|{'-' * 13}|---------|")
    for label, gb, wall, peak, opened in rows:
        print(f"| {label:15s} | {gb:5.1f} | {wall:7.1f} | {peak:11.2f} | "
              f"{opened.removeprefix('opened in ')} |")
    ratio = rows[1][2] / rows[0][2]
    print(f"GGUF / safetensors wall time: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

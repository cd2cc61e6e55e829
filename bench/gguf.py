"""Reading from GGUF against reading from safetensors: wall time and peak RSS.

The full-shape Qwen3-8B fixture (16.4 GB of bf16 safetensors, the fixture factory)
is also written as a BF16 GGUF split in 4 shards, straight from the same bytes
(llama.cpp's layout: same tensors, F32 norms). Each source then goes through the
converter's own reading path in a child process of its own, one after the other:
every quantizable weight streamed row block by row block exactly as convert.py
reads it (read_slot_rows over mlx_lm's name map), and every float tensor as
mlx_lm's sanitize makes it. The table gives each child's wall time and peak RSS
(the child's own VmHWM; ru_maxrss where there is no /proc) and a checksum of
everything read (the two must agree).
Target: the GGUF route streams like the safetensors one, peak RSS under 1 GB.

The read path is what differs between the two routes; fitting and writing are the
same code on the same numbers. `--convert` runs a whole conversion instead (uniform
4-bit g64, round-to-nearest) and `--full` the analyze -> allocate -> convert pipeline:
both take far longer (a --convert run had not finished after 10 minutes on 2 shared
cores). Writes ~33 GB of temp files under --dir (checks free space first) and deletes
them unless --keep-files.

    python bench/gguf.py [--dir /tmp/swan-bench-gguf] [--convert | --full] [--keep-files]
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
import numpy as np
source, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
start = time.perf_counter()
if source.endswith(".gguf"):
    from swan_serve.quant.sources.gguf_model import prepare_source
    source, _ = prepare_source(Path(source), out.parent / "gguf-sources")
print(f"opened in {time.perf_counter() - start:.1f} s", flush=True)
if mode == "full":
    from swan_serve.quant.build import quantize_model
    quantize_model(Path(source), out, target_bpw=4.5, force=True)
    sys.exit()
from swan_serve.quant.allocate import uniform_plan
from swan_serve.quant.convert import _BLOCK_ELEMENTS, convert
from swan_serve.quant.mlx_names import (build_model, build_name_map, checkpoint_shapes,
                                        float_tensors, read_slot_rows)
from swan_serve.quant.sources.checkpoint import open_checkpoint
ckpt = open_checkpoint(source)
model = build_model(ckpt.config)
name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt), model)
if mode == "convert":
    convert(source, out, uniform_plan(name_map, 4, 64), method="rtn", force=True)
    sys.exit()
total = 0.0
for t in name_map.quantizable():
    rows, step = t.shape[-2], max(1, _BLOCK_ELEMENTS // t.shape[-1])
    for slot in t.slots:
        for r0 in range(0, rows, step):
            total += float(read_slot_rows(ckpt, slot, r0, min(rows, r0 + step)).sum(
                dtype=np.float64))
import mlx.core as mx
for array in float_tensors(ckpt, name_map, model).values():
    total += float(array.astype(mx.float32).sum().item())
print(f"checksum {total!r}", flush=True)
"""
# The child's own high-water mark (VmHWM of its image): ru_maxrss from wait4 would also
# count the pre-exec copy of this parent, which grows while writing the fixtures.
PEAK = r"""
import atexit
from pathlib import Path
def _peak():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(f"peak_kib {line.split()[1]}", flush=True)
atexit.register(_peak)
"""


def run_child(source: Path, out: Path, mode: str) -> tuple[float, float, str, str]:
    """(wall s, peak RSS GB, opening time, checksum) of one run in a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PEAK + CHILD, str(source), str(out), mode],
                            stdout=subprocess.PIPE,
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
    peak = usage.ru_maxrss * scale / 1e9
    reported = [line for line in lines if line.startswith("peak_kib ")]
    if reported:  # Linux: the child's own VmHWM
        peak = int(reported[-1].split()[1]) * 1024 / 1e9
    opened = next((line for line in lines if line.startswith("opened in")), "")
    checksum = next((line for line in lines if line.startswith("checksum")), "")
    return wall, peak, opened, checksum.removeprefix("checksum ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/swan-bench-gguf"))
    parser.add_argument("--convert", action="store_true", help="uniform 4-bit RTN conversion")
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
        mode = "full" if args.full else "convert" if args.convert else "read"
        for label, source in (("safetensors", st_dir), ("GGUF, 4 shards", first)):
            out = args.dir / f"out-{label.split(',')[0].lower()}" / "model"
            print(f"{mode} {label} ...", flush=True)
            wall, peak, opened, checksum = run_child(source, out, mode)
            rows.append((label, sizes[label] / 1e9, wall, peak, opened, checksum))
            shutil.rmtree(out.parent, ignore_errors=True)
    finally:
        if not args.keep_files:
            shutil.rmtree(args.dir, ignore_errors=True)
    what = {"full": "analyze + budget 4.5 bpw + fit + write",
            "convert": "uniform 4-bit g64 round-to-nearest conversion",
            "read": "every weight read as convert.py reads it"}[mode]
    print(f"\nQwen3-8B full shape, bf16; {what}; one run each, same machine")
    print(f"| {'source':15s} | {'GB':>5s} | {'wall s':>7s} | {'peak RSS GB':>11s} | "
          f"{'opening':>7s} | checksum |")
    print(f"|{'-' * 17}|{'-' * 7}|{'-' * 9}|{'-' * 13}|{'-' * 9}|----------|")
    for label, gb, wall, peak, opened, checksum in rows:
        print(f"| {label:15s} | {gb:5.1f} | {wall:7.1f} | {peak:11.2f} | "
              f"{opened.removeprefix('opened in '):>7s} | {checksum} |")
    print(f"GGUF / safetensors wall time: {rows[1][2] / rows[0][2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

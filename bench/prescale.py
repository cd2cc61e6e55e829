"""Pre-scaling at equal bytes: no folding, data-free equalisation, AWQ (issue 14, 4 and 6).

The budget recipe (output objective, the default) at each target, built by
quantize_model three ways: without pre-scaling, with --equalize, and with AWQ
from the model's self-generated moments (what an imatrix would give). Scored
with bench/quality.py's functions on the same held-out windows: bits per weight
from the files, mean and p99 KL against the float model, perplexity, top-1.

    python bench/prescale.py [--models demo] [--bpw 4.5,3.5] [--max-tokens 2048]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import (  # noqa: E402  (bench/ is not a package)
    MODELS,
    UNIFORM4,
    _table,
    evaluate_np,
    held_out_text,
    mlx_lm_convert,
    storage_figures,
    windows,
)

from swan_serve.quant import moments as moments_mod  # noqa: E402
from swan_serve.quant.build import quantize_model  # noqa: E402
from swan_serve.quant.npmodel import NpModel  # noqa: E402


def run(name: str, targets: list[float], max_tokens: int) -> str:
    src = MODELS[name]
    work = Path(tempfile.mkdtemp(prefix=f"swan-prescale-{name}-"))
    try:
        moments, _ = moments_mod.self_generated(src)
        mlx_lm_convert(src, work / "uniform4", 4)
        variants = {UNIFORM4: work / "uniform4"}
        for bpw in targets:
            for label, prescale, given in (("none", None, None), ("equalize", "equalize", None),
                                           ("awq", "awq", moments)):
                out = work / f"{label}-{bpw}"
                start = time.perf_counter()
                quantize_model(src, out, target_bpw=bpw, prescale=prescale, moments=given,
                               progress=False)
                print(f"built {label} {bpw} in {time.perf_counter() - start:.1f}s",
                      file=sys.stderr)
                variants[f"budget {bpw}, prescale {label}"] = out
        ref, tokenizer = NpModel.load(src)
        data = windows(tokenizer, held_out_text(name, max_tokens * 8), max_tokens)
        results = evaluate_np(ref, variants, data)
        figures = {label: storage_figures(path) for label, path in variants.items()}
        return _table(name, src, storage_figures(src), figures, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo")
    parser.add_argument("--bpw", default="4.5,3.5")
    parser.add_argument("--max-tokens", type=int, default=2048)
    args = parser.parse_args(argv)
    targets = [float(x) for x in args.bpw.split(",")]
    for name in args.models.split(","):
        print(run(name.strip(), targets, args.max_tokens), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

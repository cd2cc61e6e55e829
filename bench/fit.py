"""Fitted scale/bias vs mx.quantize: relative weight MSE on trained weights.

For every weight matrix whose input dimension divides into groups, quantize with
MLX's own `mx.quantize` and with swan-serve's fit (quant/fit.py), dequantize
both in float32 with the scales and biases as stored (the model's 16-bit dtype;
float32 checkpoints are first rounded to bf16, as a bf16 release of them would
be), and compare relative MSE ||w_hat - w||^2 / ||w||^2, averaged over tensors.
Target: fit / mx.quantize <= 0.85 at 4-bit, group 64.

    python bench/fit.py                 # demo model and stories260K, when present
    python bench/fit.py --model DIR     # any Hugging Face safetensors checkpoint
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from swan_serve import DEMO_MODEL_DIR
from swan_serve.quant import affine, fit
from swan_serve.quant.sources.checkpoint import open_checkpoint

SHARED_STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
SETTINGS = [(4, 64), (2, 64), (3, 64), (4, 32), (4, 128), (5, 64), (6, 64), (8, 64)]
_MX_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16}


def mx_quantize_error(w: np.ndarray, bits: int, group_size: int, dtype: str) -> float:
    """Relative MSE of MLX's own quantization, scales/biases in `dtype` (as stored)."""
    q, s, b = mx.quantize(mx.array(w).astype(_MX_DTYPES[dtype]), group_size=group_size, bits=bits)
    w_hat = mx.dequantize(
        q, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits
    )
    return relative_mse(w, np.array(w_hat))


def relative_mse(w: np.ndarray, w_hat: np.ndarray) -> float:
    diff = (w_hat - w).astype(np.float64)
    return float(np.vdot(diff, diff) / np.vdot(w.astype(np.float64), w.astype(np.float64)))


def load_matrices(model_dir: Path) -> tuple[list[tuple[str, np.ndarray]], str]:
    """(name, weights) of every >= 2-D tensor, and the 16-bit storage dtype to use."""
    ckpt = open_checkpoint(model_dir)
    dtypes = {t.dtype for t in ckpt.tensors if t.ndim >= 2}
    dtype = "float16" if dtypes == {"F16"} else "bfloat16"
    mats = []
    for t in ckpt.tensors:
        if t.ndim >= 2 and "conv1d" not in t.name:
            # What a 16-bit release of this checkpoint would hold.
            w = affine.round_to_dtype(ckpt.read(t.name), dtype)
            mats.append((t.name, w.reshape(-1, t.shape[-1])))
    return mats, dtype


def bench_model(label: str, model_dir: Path, options: fit.FitOptions) -> list[list[str]]:
    mats, dtype = load_matrices(model_dir)
    rows = []
    for bits, group_size in SETTINGS:
        usable = [(n, w) for n, w in mats if w.shape[-1] % group_size == 0]
        if not usable:
            continue
        mx_err, fit_err, seconds = [], [], 0.0
        for _, w in usable:
            mx_err.append(mx_quantize_error(w, bits, group_size, dtype))
            start = time.perf_counter()
            codes, scales, biases = fit.fit(w, bits, group_size, dtype, options)
            seconds += time.perf_counter() - start
            fit_err.append(fit.relative_mse(w, codes, scales, biases, group_size))
        ratio = float(np.mean(fit_err) / np.mean(mx_err))
        per_tensor = np.array(fit_err) / np.maximum(np.array(mx_err), 1e-30)
        weights = sum(w.size for _, w in usable)
        rows.append([
            label, f"{bits}-bit g{group_size}", str(len(usable)), f"{weights / 1e6:.2f}M",
            f"{np.mean(mx_err):.3e}", f"{np.mean(fit_err):.3e}", f"{ratio:.3f}",
            f"{np.median(per_tensor):.3f}", f"{per_tensor.max():.3f}",
            f"{weights / max(seconds, 1e-9) / 1e6:.1f}",
        ])
    return rows


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", type=Path, help="model folder (repeatable)")
    parser.add_argument("--fast", action="store_true", help="use fit.FAST instead of the default")
    args = parser.parse_args(argv)
    models = [(p.name, p) for p in args.model or []]
    if not models:
        if (DEMO_MODEL_DIR / "config.json").is_file():
            models.append(("demo", DEMO_MODEL_DIR))
        if (SHARED_STORIES / "config.json").is_file():
            models.append(("stories260K", SHARED_STORIES))
    if not models:
        print("no trained model found (demo model or ../shared/models/stories260K)")
        return 1
    options = fit.FAST if args.fast else fit.DEFAULT
    print(f"fit options: {options}")
    print("relative MSE = ||w_hat - w||^2 / ||w||^2, mean over tensors; scales/biases as stored")
    header = ["model", "setting", "tensors", "weights", "mx.quantize", "swan fit",
              "ratio", "median", "worst", "fit Mw/s"]
    rows = [r for label, path in models for r in bench_model(label, path, options)]
    print_table(header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

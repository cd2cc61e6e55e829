"""Quality at equal size: swan-serve's allocation against uniform and mlx_lm recipes.

One table, one run, on the demo model (or --model): the bf16 reference,
mlx_lm.convert's uniform 4-bit g64 (its default) and 3-bit, mlx_lm's mixed_4_6,
the SWAN reference-threshold recipe, swan-serve's budgeted allocation at 4.5 and
4.0 bpw, and two ablations (fitted scales alone; allocation alone). Each row:
bits per weight (stored bits / weights, scales, biases and float tensors
included, from the files), size on disk, and against the reference on held-out
text: mean and p99 KL, perplexity, top-1 agreement.
Target: at <= 4.5 bpw, KL <= 0.7 x uniform 4-bit g64.

    python bench/quality.py [--model DIR] [--max-tokens N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

from swan_serve import DEMO_MODEL_DIR
from swan_serve.quant import allocate, evaluate
from swan_serve.quant.convert import convert
from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes, tied_embeddings
from swan_serve.quant.safetensors_out import ITEMSIZE
from swan_serve.quant.sources.checkpoint import open_checkpoint


def storage_figures(model_dir: Path) -> tuple[float, int]:
    """(bits per weight, bytes) of a checkpoint, from its files: stored bits over the
    number of weights they encode (packed uint32 words unpacked by their bits)."""
    quant = json.loads((model_dir / "config.json").read_text()).get("quantization") or {}
    total_bytes = weights = 0
    for name, (dtype, shape) in _headers(model_dir).items():
        count = math.prod(shape)
        total_bytes += count * ITEMSIZE[dtype]
        if name.endswith((".scales", ".biases")):
            continue
        if dtype == "U32":  # packed: bits from the module's entry, else the default
            setting = quant.get(name.removesuffix(".weight"))
            count = count * 32 // (setting["bits"] if isinstance(setting, dict) else quant["bits"])
        weights += count
    return 8 * total_bytes / weights, total_bytes


def _headers(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for path in sorted(model_dir.glob("model*.safetensors")):
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        out.update({k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return out


def mlx_lm_convert(src: Path, out: Path, bits: int, recipe: str | None = None) -> None:
    """mlx_lm's own converter: uniform affine (its default group 64) or a mixed recipe."""
    from mlx_lm.convert import convert as mlx_convert

    with contextlib.redirect_stdout(sys.stderr):  # its [INFO] lines, away from the table
        mlx_convert(str(src), str(out), quantize=True, q_bits=bits, q_group_size=64,
                    quant_predicate=recipe)


def build_variants(src: Path, work: Path, manifest_path: Path) -> list[tuple[str, Path, float]]:
    """(label, folder, seconds to build) for every quantized variant."""
    ckpt = open_checkpoint(src)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    jobs = [
        ("uniform 4-bit g64 (mlx_lm)", lambda o: mlx_lm_convert(src, o, 4)),
        ("uniform 3-bit g64 (mlx_lm)", lambda o: mlx_lm_convert(src, o, 3)),
        ("mixed_4_6 (mlx_lm)", lambda o: mlx_lm_convert(src, o, 4, "mixed_4_6")),
    ]
    # The last two rows split the gain: the fitted scales alone (uniform 4-bit g64,
    # as mlx_lm, but fitted) and the allocation alone (budget 4.5 with plain rounding).
    for label, recipe, bpw, method in (
        ("swan thresholds 2/4/8/16", "swan-thresholds", None, "fit"),
        ("swan budget 4.5 bpw", "budget", 4.5, "fit"),
        ("swan budget 4.0 bpw", "budget", 4.0, "fit"),
        ("ablation: uniform 4-bit g64, fit only", "uniform-4bit", None, "fit"),
        ("ablation: budget 4.5, rounding only", "budget", 4.5, "rtn"),
    ):
        plan = allocate.plan_from_manifest_file(manifest_path, name_map, recipe, bpw,
                                                tied_embeddings=tied_embeddings(ckpt.config))
        jobs.append((label, lambda o, p=plan, m=method: convert(
            src, o, p, method=m, progress=False, manifest_path=manifest_path)))
    variants = []
    for i, (label, job) in enumerate(jobs):
        out = work / f"v{i}"
        start = time.perf_counter()
        job(out)
        variants.append((label, out, time.perf_counter() - start))
        print(f"built {label} in {variants[-1][2]:.1f}s", file=sys.stderr)
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--max-tokens", type=int, default=evaluate.DEFAULT_MAX_TOKENS)
    parser.add_argument("--seq-len", type=int, default=evaluate.DEFAULT_SEQ_LEN)
    parser.add_argument("--keep", type=Path, help="keep the converted variants in this folder")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"no model at {args.model}")
        return 1
    from swan_serve.quant.analyze import analyze_checkpoint

    work = args.keep or Path(tempfile.mkdtemp(prefix="swan-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        manifest_path = work / "manifest.json"
        analyze_checkpoint(args.model, progress=False).save(manifest_path)
        variants = build_variants(args.model, work, manifest_path)
        ref, tokenizer = evaluate.load_model(args.model)
        text = evaluate.default_text(max_chars=args.max_tokens * 10)
        data = evaluate.windows(tokenizer, text, args.seq_len, args.max_tokens)
        models = {label: evaluate.load_model(path)[0] for label, path, _ in variants}
        results = evaluate.compare(ref, models, data)
        figures = {label: storage_figures(path) for label, path, _ in variants}
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(_table(args.model, storage_figures(args.model), figures, results))
    return 0


def _table(model: Path, ref_figures: tuple[float, int], figures, results) -> str:
    base = results["uniform 4-bit g64 (mlx_lm)"].kl_mean
    any_result = next(iter(results.values()))
    lines = [f"model {model}; {any_result.tokens} held-out tokens; KL(ref || quant) in nats; "
             "bpw = stored bits / weights (scales, biases, float tensors included)"]
    header = ["variant", "bpw", "size MB", "KL mean", "KL p99", "KL / 4-bit", "PPL", "top-1"]
    body = [["bf16 (reference)", f"{ref_figures[0]:.3f}", f"{ref_figures[1] / 1e6:.1f}", "0",
             "0", "-", f"{any_result.ppl_ref:.3f}", "100.00%"]]
    for label, (bpw, size) in figures.items():
        r = results[label]
        body.append([label, f"{bpw:.3f}", f"{size / 1e6:.1f}", f"{r.kl_mean:.4f}",
                     f"{r.kl_p99:.4f}", f"{r.kl_mean / base:.2f}x", f"{r.ppl_quant:.3f}",
                     f"{100 * r.top1:.2f}%"])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))  # noqa: E731
    return "\n".join([lines[0], fmt(header), "-" * len(fmt(header)), *map(fmt, body)])


if __name__ == "__main__":
    sys.exit(main())

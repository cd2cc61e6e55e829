"""Quality at equal size: swan-serve's allocation against uniform and mlx_lm recipes.

One table per model, one run: the float reference, mlx_lm.convert's uniform
4-bit g64 (its default) and 3-bit g64, mlx_lm's mixed_4_6, the SWAN reference
thresholds, swan-serve's budget recipe at 4.5 and 3.5 bpw with the output
objective (the default) and with the earlier weight objective, the same without
group 32 among the candidates, and ablations of the output objective (no
importance-weighted fit; no class calibration). Each row: bits per weight
(stored bits / weights, scales, biases and float tensors included, from the
files), size, and against the reference on held-out text: mean and p99 KL,
perplexity, top-1 agreement. Models run in numpy (quant/npmodel.py; MLX's CPU
matmul is ~30x slower), every variant on the same token windows.

Models (--models, comma separated):
  smollm2  SmolLM2-135M-Instruct, a real pretrained model, made by
           scripts/smollm2_reference.py (skipped with a note when absent); held-out
           text: English prose, the docstrings of the standard library's held-out
           modules (quant/fixtures/corpus.py), not the model's own generations
  demo     the bundled demo model (held-out standard-library source)
  stories  Karpathy's stories260K (/work/shared/models, trained on TinyStories;
           held-out text: the same English prose)

    python bench/quality.py [--models smollm2,demo,stories] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from swan_serve import DEMO_MODEL_DIR
from swan_serve.quant import allocate, objective
from swan_serve.quant.convert import convert
from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes, tied_embeddings
from swan_serve.quant.npmodel import NpModel
from swan_serve.quant.recipe import load_recipe
from swan_serve.quant.safetensors_out import ITEMSIZE
from swan_serve.quant.sensitivity import Sensitivity
from swan_serve.quant.sources.checkpoint import open_checkpoint

SMOLLM2 = Path(os.environ.get("SWAN_SMOLLM2_DIR",
                              Path.home() / ".cache" / "swan-serve-bench" / "smollm2"))
STORIES = Path("/work/shared/models/stories260K")
MODELS = {"smollm2": SMOLLM2, "demo": DEMO_MODEL_DIR, "stories": STORIES}
SEQ_LEN = 256
UNIFORM4 = "uniform 4-bit g64 (mlx_lm)"


def english_text(max_chars: int) -> str:
    """English prose no model here generated: held-out standard-library docstrings."""
    from swan_serve.quant.fixtures.corpus import doc_entries

    docs = [e.docstring for e in doc_entries("heldout") if len(e.docstring) > 200]
    return "\n\n".join(docs)[:max_chars]


def held_out_text(name: str, max_chars: int) -> str:
    if name == "demo":
        from swan_serve.quant.evaluate import default_text

        return default_text(max_chars)
    return english_text(max_chars)


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


def _recipe(objective_name: str, groups: list[int] | None = None):
    recipe = load_recipe("budget")
    update = {"objective": objective_name}
    if groups is not None:
        update["group_sizes"] = groups
    return recipe.model_copy(update={"budget": recipe.budget.model_copy(update=update)})


def build_variants(src: Path, work: Path, core_only: bool = False,
                   ) -> list[tuple[str, Path, float]]:
    """(label, folder, seconds to build) for every quantized variant."""
    from swan_serve.quant.analyze import analyze_checkpoint

    ckpt = open_checkpoint(src)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    tied = tied_embeddings(ckpt.config)
    manifest = analyze_checkpoint(src, progress=False)
    manifest_path = work / "manifest.json"
    manifest.save(manifest_path)
    start = time.perf_counter()
    sens, moments = objective.measure(src, manifest, _recipe("output"), name_map=name_map)
    print(f"{src.name}: output objective measured in {time.perf_counter() - start:.1f}s; "
          f"class gains {sens.class_gain}", file=sys.stderr)
    sens.save(work / "sensitivity.json")  # kept with --keep, for reading the plans
    flat = Sensitivity(errors=sens.errors, class_gain={})  # every class gain 1
    mode_sens = _with_modes(src, manifest, name_map, sens, moments)

    def swan(recipe, bpw, sensitivity, weighted_fit=True, name="budget"):
        recipe = load_recipe(name) if recipe is None else recipe

        def job(out: Path) -> None:
            try:
                plan = allocate.build_plan(manifest, name_map, recipe, bpw,
                                           tied_embeddings=tied, sensitivity=sensitivity)
            except allocate.AllocationError:  # a model whose floor is above the target
                # (stories260K: its 172-wide down_proj stays float): equal bytes with the
                # uniform row of the same bits instead (floats counted alike)
                same_bytes = allocate.uniform_plan(name_map, 4 if bpw > 4 else 3, 64)
                plan = allocate.build_plan(manifest, name_map, recipe,
                                           same_bytes.achieved_bpw, tied_embeddings=tied,
                                           sensitivity=sensitivity)
            convert(src, out, plan, progress=False, manifest_path=manifest_path,
                    moments=moments if weighted_fit else None)

        return job

    jobs = [
        (UNIFORM4, lambda o: mlx_lm_convert(src, o, 4)),
        ("uniform 3-bit g64 (mlx_lm)", lambda o: mlx_lm_convert(src, o, 3)),
    ]
    if not core_only:
        jobs += [
            ("mixed_4_6 (mlx_lm)", lambda o: mlx_lm_convert(src, o, 4, "mixed_4_6")),
            ("swan thresholds 2/4/8/16", swan(None, None, None, False, "swan-thresholds")),
        ]
    for bpw in (4.5, 3.5):
        jobs += [
            (f"budget {bpw}, weight objective (old)", swan(_recipe("weight"), bpw, None, False)),
            (f"budget {bpw}, output objective (new)", swan(_recipe("output"), bpw, sens)),
            (f"budget {bpw}, new, no group 32", swan(_recipe("output", [64, 128]), bpw, sens)),
            (f"budget {bpw}, new + mxfp4/nvfp4/mxfp8 modes",
             swan(load_recipe("budget-mxfp"), bpw, mode_sens)),
        ]
        if not core_only:
            jobs += [
                (f"budget {bpw}, new, plain fit (ablation)",
                 swan(_recipe("output"), bpw, sens, False)),
                (f"budget {bpw}, new, no class gains (ablation)",
                 swan(_recipe("output"), bpw, flat)),
            ]
    variants = []
    for i, (label, job) in enumerate(jobs):
        out = work / f"v{i}"
        start = time.perf_counter()
        try:
            job(out)
        except Exception as exc:  # e.g. a budget below what the model allows
            print(f"skipped {label}: {exc}", file=sys.stderr)
            continue
        variants.append((label, out, time.perf_counter() - start))
        print(f"built {label} in {variants[-1][2]:.1f}s", file=sys.stderr)
    return variants


def _with_modes(src: Path, manifest, name_map, sens: Sensitivity, moments) -> Sensitivity:
    """sens plus the budget-mxfp recipe's microscaling candidates (same moments, gains)."""
    from swan_serve.quant.allocate import budget_settings, build_units
    from swan_serve.quant.sensitivity import candidate_errors
    from swan_serve.quant.settings import mode_of

    recipe = load_recipe("budget-mxfp")
    extra = {m: [s for s in ss if mode_of(s) != "affine"]
             for m, ss in budget_settings(build_units(manifest, name_map, recipe), recipe).items()}
    errors = candidate_errors(open_checkpoint(src), name_map, moments, extra)
    merged = {m: {**sens.errors.get(m, {}), **errors.get(m, {})} for m in sens.errors}
    return Sensitivity(errors=merged, class_gain=sens.class_gain,
                       moments_source=sens.moments_source)


def evaluate_np(ref: NpModel, variants: dict[str, Path], data: np.ndarray) -> dict[str, dict]:
    """KL(ref || quant) mean/p99, perplexities, top-1 agreement per variant."""
    inputs, targets = data[:, :-1], data[:, 1:]
    ref_lp = np.concatenate([_log_probs(ref.forward(inputs[i:i + 1])) for i in range(len(data))])
    ref_nll = -np.take_along_axis(ref_lp, targets[..., None], -1)
    ref_top = ref_lp.argmax(-1)
    out = {}
    for label, path in variants.items():
        model, _ = NpModel.load(path)
        lp = np.concatenate([_log_probs(model.forward(inputs[i:i + 1]))
                             for i in range(len(data))])
        kl = np.maximum(np.sum(np.exp(ref_lp) * (ref_lp - lp), axis=-1), 0.0).ravel()
        nll = -np.take_along_axis(lp, targets[..., None], -1)
        out[label] = {"kl": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
                      "ppl": math.exp(float(nll.mean())),
                      "top1": float((lp.argmax(-1) == ref_top).mean()),
                      "ppl_ref": math.exp(float(ref_nll.mean())), "tokens": int(kl.size)}
        print(f"evaluated {label}: KL {out[label]['kl']:.4f}", file=sys.stderr)
    return out


def _log_probs(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def windows(tokenizer, text: str, max_tokens: int) -> np.ndarray:
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    count = min(len(ids) - 1, max_tokens) // SEQ_LEN
    return np.stack([ids[i * SEQ_LEN: (i + 1) * SEQ_LEN + 1] for i in range(count)])


def run_model(name: str, src: Path, max_tokens: int, keep: Path | None,
              core_only: bool = False) -> str:
    work = (keep / name) if keep else Path(tempfile.mkdtemp(prefix=f"swan-quality-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        variants = build_variants(src, work, core_only)
        ref, tokenizer = NpModel.load(src)
        data = windows(tokenizer, held_out_text(name, max_tokens * 8), max_tokens)
        results = evaluate_np(ref, {label: path for label, path, _ in variants}, data)
        figures = {label: storage_figures(path) for label, path, _ in variants}
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return _table(name, src, storage_figures(src), figures, results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,demo,stories",
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--max-tokens", type=int, default=2048,
                        help="held-out tokens scored per model (windows of 256)")
    parser.add_argument("--keep", type=Path, help="keep the converted variants in this folder")
    parser.add_argument("--core", action="store_true",
                        help="only uniform and budget rows (no mixed_4_6, thresholds, ablations)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]}; choose from {', '.join(MODELS)}")
    for name in names:
        src = MODELS[name]
        if not (src / "config.json").is_file():
            print(f"{name}: skipped, no model at {src}"
                  + (" (make it with scripts/smollm2_reference.py)" if name == "smollm2" else ""))
            continue
        print(run_model(name, src, args.max_tokens, args.keep, args.core), flush=True)
    return 0


def _table(name: str, model: Path, ref_figures, figures, results) -> str:
    base = results[UNIFORM4]["kl"] if UNIFORM4 in results else float("nan")
    any_result = next(iter(results.values()))
    lines = [f"\n{name} ({model}); {any_result['tokens']} held-out tokens; KL(ref || quant) "
             "in nats; bpw = stored bits / weights (scales, biases, float tensors included)"]
    header = ["variant", "bpw", "size MB", "KL mean", "KL p99", "KL / 4-bit", "PPL", "top-1"]
    body = [["float (reference)", f"{ref_figures[0]:.3f}", f"{ref_figures[1] / 1e6:.1f}", "0",
             "0", "-", f"{any_result['ppl_ref']:.3f}", "100.00%"]]
    for label, (bpw, size) in figures.items():
        r = results[label]
        body.append([label, f"{bpw:.3f}", f"{size / 1e6:.1f}", f"{r['kl']:.4f}",
                     f"{r['kl_p99']:.4f}", f"{r['kl'] / base:.2f}x", f"{r['ppl']:.3f}",
                     f"{100 * r['top1']:.2f}%"])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([lines[0], fmt(header), sep, *map(fmt, body)])


if __name__ == "__main__":
    sys.exit(main())

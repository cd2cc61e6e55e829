"""The seed recipe against the budget, with and without an imatrix, at equal bytes.

Issue 14's table, one run per model: uniform 4-bit and 3-bit g64 (mlx_lm) as the
baselines; Unsloth's layer rules (`--recipe unsloth`, d = 4 and 3; `unsloth-mxfp`)
without and with an imatrix (AWQ pre-scaling on, as in the seed pipeline); and
swan-serve's budget at each Unsloth variant's own bits per weight, without an
imatrix (self-generated moments: the default), with the same imatrix (AWQ on, and
off), and with the data-free equaliser.

The imatrix is a real llama.cpp GGUF imatrix file written from the float model run
on calibration text disjoint from the evaluation text (demo: the standard library's
training split; stories: the second half of bench/texts/simple_stories.txt, whose
first half is scored; smollm2: the training split's docstrings).

    python bench/recipes.py [--models demo,stories] [--max-tokens 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

# quality.py is imported from this folder, but behind site-packages: bench/gguf.py
# would otherwise shadow the gguf package that writes the imatrix file.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(_HERE)] + [_HERE]

from quality import (  # noqa: E402
    MODELS,
    _table,
    evaluate_np,
    held_out_text,
    mlx_lm_convert,
    simple_stories,
    storage_figures,
    windows,
)

from swan_serve.quant.build import quantize_model  # noqa: E402
from swan_serve.quant.fixtures.imatrix_files import record_sums, write_gguf  # noqa: E402
from swan_serve.quant.npmodel import NpModel  # noqa: E402
from swan_serve.quant.recipe import load_recipe, with_base_bits  # noqa: E402

UNIFORM4 = "uniform 4-bit g64 (mlx_lm)"  # quality._table's baseline row


def calibration_text(name: str, eval_chars: int) -> str:
    """Text for the imatrix, disjoint from what is scored."""
    if name == "stories":
        return simple_stories(10**6)[eval_chars:]
    from swan_serve.quant.fixtures.corpus import doc_entries, train_text

    if name == "demo":
        return train_text(6000)
    docs = [e.docstring for e in doc_entries("train") if len(e.docstring) > 200]
    return "\n\n".join(docs)[:6000]


def variants(src: Path, work: Path, imatrix: Path) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []

    def build(label: str, job) -> Path | None:
        folder = work / f"v{len(out)}"
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                job(folder)
        except Exception as exc:  # e.g. a target below what the model allows
            print(f"skipped {label}: {exc}", file=sys.stderr)
            return None
        print(f"built {label} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        out.append((label, folder))
        return folder

    def ours(recipe, bpw=None, with_imatrix=False, prescale=None):
        return lambda o: quantize_model(src, o, recipe=recipe, target_bpw=bpw, progress=False,
                                        imatrix=imatrix if with_imatrix else None,
                                        prescale=prescale)

    build(UNIFORM4, lambda o: mlx_lm_convert(src, o, 4))
    build("uniform 3-bit g64 (mlx_lm)", lambda o: mlx_lm_convert(src, o, 3))
    seeds = [(f"unsloth d={d}", with_base_bits(load_recipe("unsloth"), d, None))
             for d in (4, 3)] + [("unsloth-mxfp", load_recipe("unsloth-mxfp"))]
    budget = load_recipe("budget")
    for name, recipe in seeds:
        folder = build(name, ours(recipe))
        if folder is None:
            continue
        bpw = round(storage_figures(folder)[0], 4)
        build(f"{name} + imatrix (AWQ)", ours(recipe, None, True, "awq"))
        build(f"budget @ {name} bytes", ours(budget, bpw))
        build(f"budget @ {name} bytes + imatrix (AWQ)", ours(budget, bpw, True, "awq"))
        build(f"budget @ {name} bytes + imatrix, no AWQ", ours(budget, bpw, True))
        build(f"budget @ {name} bytes + equalize", ours(budget, bpw, False, "equalize"))
    return out


def run_model(name: str, src: Path, max_tokens: int, keep: Path | None) -> str:
    work = (keep / name) if keep else Path(tempfile.mkdtemp(prefix=f"swan-recipes-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ref, tokenizer = NpModel.load(src)
        eval_text = held_out_text(name, max_tokens * 8)
        data = windows(tokenizer, eval_text, max_tokens)
        scored_chars = len(tokenizer.decode(data.reshape(-1).tolist()))  # what is scored
        imatrix = write_gguf(work / "imatrix.gguf",
                             record_sums(src, calibration_text(name, scored_chars + 200)))
        built = variants(src, work, imatrix)
        results = evaluate_np(ref, dict(built), data)
        figures = {label: storage_figures(path) for label, path in built}
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return _table(name, src, storage_figures(src), figures, results, same_bits=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,stories",
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="held-out tokens scored per model (windows of 256)")
    parser.add_argument("--keep", type=Path, help="keep the converted variants in this folder")
    args = parser.parse_args(argv)
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        if name not in MODELS:
            parser.error(f"unknown model {name}; choose from {', '.join(MODELS)}")
        src = MODELS[name]
        if not (src / "config.json").is_file():
            print(f"{name}: skipped, no model at {src}")
            continue
        print(run_model(name, src, args.max_tokens, args.keep), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

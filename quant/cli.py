"""swan-quant: the quantizer on its own (analyze, convert, eval, inspect, validate).

A thin dispatcher: each subcommand is one `add_<name>` function that declares its
arguments and one `run_<name>` function that does the work and returns an exit
code. Known input errors print one line (`swan-quant: error: ...`) and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cache_cli import CacheCommandError, add_cache
from .manifest import ManifestError
from .prescale_options import (
    MomentsFileError,
    add_prescale_flags,
    load_moments_file,
    prescale_choice,
)
from .scoring import ConfigError
from .sources.checkpoint import CheckpointError
from .sources.imatrix import ImatrixError

INPUT_ERRORS: tuple[type[Exception], ...] = (
    CheckpointError, ManifestError, ConfigError, CacheCommandError, ImatrixError,
    MomentsFileError)


class CommandError(Exception):
    """A user-facing failure of a subcommand; the message is one line."""


def add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="SWAN metrics of every tensor -> manifest.json")
    p.add_argument("model", help="Hugging Face checkpoint directory (or hub id)")
    p.add_argument("-o", "--output", required=True, help="manifest path to write")
    p.add_argument("--config", default=None, help="preset name or TOML file (swan-default)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--workers", type=int, default=None, help="tensors analysed in parallel")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_gguf_options(p)
    p.set_defaults(run=run_analyze)


def _add_gguf_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gguf-file", default=None, metavar="PATTERN",
                   help="GGUF: which file(s) of a folder or hub repo (e.g. Q4_K_M, BF16)")
    p.add_argument("--tokenizer", default=None, metavar="HF_ID_OR_DIR",
                   help="GGUF: use this model's tokenizer files instead of rebuilding them")


def _model_dir(model: str, args: argparse.Namespace | None = None) -> Path:
    gguf_file, tokenizer = getattr(args, "gguf_file", None), getattr(args, "tokenizer", None)
    from .sources.gguf_model import wants_gguf

    if wants_gguf(model, gguf_file) or tokenizer:
        from .sources.resolve import ResolveError, resolve_model

        try:
            return resolve_model(model, gguf_file=gguf_file, tokenizer=tokenizer).path
        except ResolveError as exc:
            raise CommandError(str(exc)) from None
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        return path
    from .sources.resolve import (  # a hub id: download (or use the cache)
        ResolveError,
        resolve_model,
    )

    try:
        return resolve_model(model).path
    except ResolveError as exc:
        raise CommandError(str(exc)) from None


def run_analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze_checkpoint
    from .scoring import load_config

    config = load_config(args.config)
    updates = {k: v for k, v in (("seed", args.seed), ("workers", args.workers)) if v is not None}
    if updates:
        config = config.model_copy(update={"analysis": config.analysis.model_copy(update=updates)})
    manifest = analyze_checkpoint(_model_dir(args.model, args), config,
                                  progress=not args.no_progress)
    manifest.save(args.output)
    q = manifest.summary.composite_quantiles
    print(
        f"wrote {args.output}: {len(manifest.tensors)} tensors, "
        f"{manifest.summary.quantizable} quantizable; composite "
        f"min {q.get('min')} p50 {q.get('p50')} max {q.get('max')}"
    )
    return 0


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise a manifest.json or a model directory")
    p.add_argument("target", help="manifest.json or a checkpoint directory")
    p.add_argument("--top", type=int, default=10, help="most sensitive tensors to list")
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from .inspect_view import describe_checkpoint, describe_manifest

    target = Path(args.target)
    if target.is_file():
        print(describe_manifest(target, args.top))
    elif target.is_dir():
        print(describe_checkpoint(target))
    else:
        raise CommandError(f"{target} is neither a manifest file nor a model directory")
    return 0


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="quantize a Hugging Face model into an MLX checkpoint")
    p.add_argument("model", help="Hugging Face checkpoint directory, hub id, or GGUF file/folder")
    p.add_argument("-o", "--output", required=True, help="MLX model directory to write")
    p.add_argument("--target-bpw", type=float, default=None,
                   help="bits per weight, scales/biases and float tensors counted "
                        "(budget recipe; default 4.5)")
    p.add_argument("--recipe", default="budget",
                   help="budget | swan-thresholds | uniform-4bit | mixed-4-6 | a TOML file | "
                        "unsloth | unsloth-mxfp | keep (GGUF: carry its own grid over)")
    p.add_argument("--q-bits", type=int, default=None, metavar="D",
                   help="unsloth recipes: the base width d the layer rules add to (default 4)")
    p.add_argument("--q-group-size", type=int, default=None, metavar="G",
                   help="unsloth recipes: the base group size (default 64)")
    p.add_argument("--manifest", type=Path, default=None, help="use this manifest, do not analyse")
    p.add_argument("--config", default=None, help="analysis preset or TOML (swan-default)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--imatrix", type=Path, default=None, metavar="FILE",
                   help="llama.cpp importance matrix (imatrix.gguf or legacy .dat): its input "
                        "moments weight the analysis, the budget and the group fit")
    _add_gguf_options(p)
    add_prescale_flags(p.add_argument)
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from .allocate import AllocationError
    from .build import BuildError, quantize_model
    from .convert import ConvertError
    from .mlx_names import NameMapError
    from .recipe import RecipeError, load_recipe, with_base_bits

    out = Path(args.output).expanduser()
    if out.is_dir() and any(out.iterdir()) and not args.force:  # before minutes of analysis
        raise CommandError(f"{out} is not empty; pass --force to replace it")
    moments = load_moments_file(args.moments) if args.moments else None
    prescale = prescale_choice(moments is not None or args.imatrix is not None, args.no_awq,
                               args.equalize)
    try:
        recipe = "keep" if args.recipe == "keep" else with_base_bits(
            load_recipe(args.recipe), args.q_bits, args.q_group_size)
        if recipe == "keep" and (args.q_bits or args.q_group_size):
            raise CommandError("--recipe keep keeps the GGUF's own bits; drop --q-bits")
        if args.target_bpw is not None and recipe == "keep":
            raise CommandError("--recipe keep keeps the GGUF's own bits; drop --target-bpw")
        if args.target_bpw is not None and recipe.mode not in ("budget", "classes"):
            raise CommandError(f"--target-bpw needs a budget recipe (or a class-rule one); "
                               f"{recipe.name} is {recipe.mode}")
        result = quantize_model(_model_dir(args.model, args), out, recipe=recipe,
                                target_bpw=args.target_bpw, analysis_config=args.config,
                                manifest_path=args.manifest, force=args.force,
                                progress=not args.no_progress, imatrix=args.imatrix,
                                moments=moments, prescale=prescale,
                                log=lambda m: print(f"swan-quant: {m}", file=sys.stderr))
    except (AllocationError, BuildError, ConvertError, NameMapError, RecipeError) as exc:
        raise CommandError(str(exc)) from None
    plan = result.plan
    target = f" (target {plan.target_bpw})" if plan.target_bpw is not None else ""
    print(f"wrote {out}: {plan.achieved_bpw:.3f} bpw{target}, "
          f"{result.bytes_written / 1e6:.1f} MB, recipe {plan.recipe}")
    for setting, params in plan.summary().items():
        print(f"  {setting:10s} {params / plan.total_params:7.2%} of weights")
    kept = [d for d in plan.decisions.values() if not d.quantized]
    for d in kept:
        print(f"  kept in float: {d.module} ({d.reason})")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    from .evaluate import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN

    p = sub.add_parser("eval", help="KL, perplexity and top-1 agreement of QUANT against REF")
    p.add_argument("ref", help="reference model directory (e.g. the bf16 original)")
    p.add_argument("quant", help="quantized MLX model directory")
    p.add_argument("--text", type=Path, default=None,
                   help="UTF-8 text file (default: held-out text the demo model never saw)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    p.add_argument("--batch-size", type=int, default=None, help="windows per batch (auto)")
    p.add_argument("--dtype", choices=("float32", "model"), default="float32",
                   help="compute dtype: float32 measures the weights alone (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalError, evaluate, format_table

    for model in (args.ref, args.quant):
        if not (Path(model) / "config.json").is_file():
            raise CommandError(f"{model} is not a model directory (no config.json)")
    try:
        text = args.text.read_text(encoding="utf-8") if args.text is not None else None
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {args.text}: {exc}") from None
    try:
        result = evaluate(args.ref, args.quant, text, seq_len=args.seq_len,
                          max_tokens=args.max_tokens, batch_size=args.batch_size,
                          dtype=args.dtype, progress=not args.no_progress)
    except EvalError as exc:
        raise CommandError(str(exc)) from None
    print(format_table([(str(args.quant), result)]))
    return 0


def add_validate(sub: argparse._SubParsersAction) -> None:
    from .validate import DEFAULT_THRESHOLD

    p = sub.add_parser("validate", help="per-tensor cosine of QUANT's dequantized weights "
                                        "against a reference")
    p.add_argument("quant", help="quantized MLX model directory")
    p.add_argument("--reference", required=True,
                   help="another MLX checkpoint, or the float source (HF folder, hub id "
                        "or GGUF)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="cosine a quantized tensor needs to PASS (default %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the full report as JSON (- for standard output)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_gguf_options(p)
    p.set_defaults(run=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    from .mlx_names import NameMapError
    from .validate import format_report, validate, write_json
    from .validate_sources import is_mlx_checkpoint

    if not 0.0 < args.threshold <= 1.0:
        raise CommandError(f"--threshold must be in (0, 1], got {args.threshold}")
    quant = Path(args.quant).expanduser()
    if not is_mlx_checkpoint(quant):
        raise CommandError(f"{quant} is not a quantized MLX model directory "
                           "(no \"quantization\" in its config.json)")
    try:
        reference = _model_dir(args.reference, args)  # a GGUF file or hub id is resolved
        report = validate(quant, reference, args.threshold, progress=not args.no_progress)
    except NameMapError as exc:
        raise CommandError(str(exc)) from None
    table = format_report(report)
    print(table, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json is not None:
        write_json(report, args.json)
    return 0 if report.passed else 1


SUBCOMMANDS = (add_analyze, add_convert, add_eval, add_inspect, add_cache, add_validate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swan-quant",
        description="Data-free SWAN analysis and mixed-precision MLX conversion.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (CommandError, *INPUT_ERRORS) as exc:
        print(f"swan-quant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("swan-quant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""swan-serve: quantize a model once (cached), then serve it over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from swan_serve import DEMO_MODEL_DIR, __version__
from swan_serve.quant.build import BuildError, BuildOptions, prepare_build
from swan_serve.quant.cache import CacheError
from swan_serve.quant.prescale_options import add_prescale_flags
from swan_serve.quant.progress import ProgressCallback
from swan_serve.quant.sources.resolve import ResolveError

from .engine.engine import ModelProvider

if TYPE_CHECKING:
    from .engine.group import Distributed
from .parsers.registry import CHOICES
from .settings import (
    API_KEY_ENV,
    PREFIX_CACHE_DIR_ENV,
    ServerSettings,
    api_key_from_env,
    parse_byte_size,
    prefix_cache_dir_from_env,
)

DEMO_MODEL_NAME = "demo"
# What a bad MODEL raises; each message is one line written for the user.
MODEL_ERRORS = (BuildError, CacheError, ResolveError)


def prepare_model(args: argparse.Namespace) -> tuple[Path | None, ModelProvider | None]:
    """MODEL argument -> (a directory to serve as it is, or a provider that finds or
    builds the quantized one on the generation thread). The one place a model source is
    decided; quant/ does the resolving, checking and building.

    Local directories are resolved and checked here, before the server listens, so a bad
    model fails at once; a hub id is downloaded by the provider (it may take a while).
    """
    from swan_serve.quant.sources.gguf_model import wants_gguf
    from swan_serve.quant.sources.resolve import looks_like_repo_id, resolve_model

    model = args.model or str(DEMO_MODEL_DIR)
    if args.no_quantize:
        if wants_gguf(model, args.gguf_file):
            raise ResolveError("--no-quantize serves safetensors as they are; GGUF weights "
                               "are converted (try --recipe keep to keep their own grid)")
        if args.imatrix is not None:
            raise BuildError("--imatrix guides quantization; --no-quantize does none")
        return resolve_model(model, args.revision).path, None
    if args.imatrix is not None and not Path(args.imatrix).expanduser().is_file():
        raise BuildError(f"no such imatrix file: {args.imatrix}")
    options = BuildOptions(target_bpw=args.target_bpw, recipe=args.recipe,
                           q_bits=args.q_bits, q_group_size=args.q_group_size,
                           cache_dir=args.cache_dir, rebuild=args.rebuild,
                           revision=args.revision, gguf_file=args.gguf_file,
                           tokenizer=args.tokenizer,
                           imatrix=None if args.imatrix is None else str(args.imatrix),
                           moments_file=args.moments, no_awq=args.no_awq,
                           equalize=args.equalize)
    if looks_like_repo_id(model):
        return None, lambda on_progress: _build_from_hub(model, options, on_progress)
    prepared = prepare_build(model, options)
    return None, lambda on_progress: prepared.build(on_progress, log=_log_line)


def _build_from_hub(model: str, options: BuildOptions, on_progress: ProgressCallback) -> Path:

    on_progress("download", 0.0)
    prepared = prepare_build(model, options)
    on_progress("download", 1.0)
    return prepared.build(on_progress, log=_log_line)


def _log_line(message: str) -> None:
    print(f"swan-serve: {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swan-serve",
        # "--max-tokens 8192" must never silently mean --max-tokens-default's abbreviation.
        allow_abbrev=False,
        description="Quantize a model once (SWAN, cached) and serve it over an "
        "OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, "
        "/health, /metrics).",
    )
    add = parser.add_argument
    add("model", nargs="?", metavar="MODEL",
        help="Hugging Face repo id or local directory (default: the bundled demo model); "
        "an unquantized model is quantized once into the cache, an MLX quantized one is "
        "served as it is")
    add("--model", dest="model_flag", metavar="MODEL",
        help="the same as the positional MODEL (as vLLM and vMLX spell it)")
    add("--version", action="version", version=f"swan-serve {__version__}")
    add("--target-bpw", type=float, default=None,
        help="bits per weight the quantizer aims at, scales and biases counted (default: "
        "4.5; with --recipe unsloth none: the recipe as it is, and a target makes it a floor)")
    add("--recipe", default="budget",
        help="allocation recipe: a name from configs/ (budget, swan-thresholds, "
        "uniform-4bit, mixed-4-6), a TOML file, or keep (GGUF MODEL: carry its own "
        "quantization grid over where MLX represents it exactly), unsloth or unsloth-mxfp "
        "(Unsloth's layer rules) (default: budget)")
    add("--q-bits", type=int, default=None, metavar="D",
        help="unsloth recipes: the base width d the layer rules add to (default: 4)")
    add("--q-group-size", type=int, default=None, metavar="G",
        help="unsloth recipes: the base group size (default: 64)")
    add("--cache-dir", type=Path,
        help="where quantized builds are kept (default: $SWAN_SERVE_CACHE or "
        "~/.cache/swan-serve)")
    add("--rebuild", action="store_true", help="quantize again even if the cache has a build")
    add("--revision", help="hub revision (branch, tag or commit) of MODEL")
    add("--gguf-file", metavar="PATTERN",
        help="MODEL's GGUF file(s) to use when a folder or hub repo holds several quants "
        "(e.g. Q4_K_M, UD-Q4_K_XL, BF16); only the matching shards are downloaded")
    add("--tokenizer", metavar="HF_ID_OR_DIR",
        help="GGUF MODEL: take the tokenizer from the original model instead of rebuilding "
        "it from the GGUF metadata")
    add("--imatrix", type=Path, metavar="FILE",
        help="llama.cpp importance matrix (imatrix.gguf or legacy .dat) for MODEL: its input "
        "moments weight the analysis, the bit budget and the group fit; part of the cache key")
    add_prescale_flags(add)
    add("--no-quantize", action="store_true",
        help="serve the model's weights as they are, without quantizing")
    add("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    add("--port", type=int, default=8000, help="port to bind (default: 8000)")
    add("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 routes "
        f"(or set {API_KEY_ENV})")
    add("--max-concurrency", type=int, default=8,
        help="sequences decoded together in one batch (default: 8)")
    add("--max-queue", type=int, default=64,
        help="sequences that may wait for a batch slot; beyond it requests get 429 (default: 64)")
    add("--cors-origin", action="append", default=[], metavar="ORIGIN",
        help="allow browser requests from ORIGIN (repeatable; CORS is off by default)")
    add("--served-model-name", action="extend", nargs="+", default=[], metavar="NAME",
        help="model id(s) clients use; the first is reported (repeatable; default: MODEL "
        "as given and its last path part, or 'demo' for the bundled demo model)")
    add("--max-tokens-default", "--max-tokens", dest="max_tokens_default", type=int,
        default=512,
        help="max_tokens when a request gives none (default: 512)")
    add("--max-model-len", type=int, help="context length (default: from the model config)")
    add("--max-n", type=int, default=8, help="largest n a request may ask for (default: 8)")
    add("--max-body-mb", type=float, default=4.0,
        help="largest request body in MiB (default: 4)")
    add("--prefill-step-size", type=int, default=512,
        help="prompt tokens per engine step (default: 512)")
    add("--tool-call-parser", default="auto", choices=CHOICES, metavar="NAME",
        help="tool-call format: auto (from the chat template), none, or one of "
        f"{', '.join(c for c in CHOICES if c not in ('auto', 'none'))} (default: auto)")
    add("--dtype", default="auto", choices=["auto", "model", "float32", "float16", "bfloat16"],
        help="compute dtype for float parameters; auto measures float32 against the model "
        "dtype on CPU devices and keeps the model dtype on GPUs (default: auto)")
    add("--prefix-cache-bytes", type=_byte_size, metavar="SIZE",
        help="memory for cached prompt prefixes (KV states), e.g. 2GiB or 512MB; 0 turns the "
        "prefix cache off (default: whatever the KV memory of --max-kv-bytes the running batch "
        "leaves)")
    add("--prefix-cache-dir", type=Path, metavar="DIR",
        help="keep prefix-cache states evicted from memory here (one file each, crash-safe) "
        f"and find them again after a restart (or set {PREFIX_CACHE_DIR_ENV}; default: "
        "memory only)")
    add("--parallel", choices=["tensor", "pipeline"],
        help="under mlx.launch (several ranks): split the model by tensor (every layer "
        "across ranks) or by pipeline (layers across ranks, where mlx-lm supports it) "
        "(default: tensor)")
    add("--step-timeout", type=float, default=60.0, metavar="SECONDS",
        help="under mlx.launch: a rank silent for this long ends the group (default: 60)")
    add("--kv-bits", type=int, choices=[4, 8],
        help="store the attention KV cache (running batch and prefix cache) quantized to "
        "this many bits (default: the model's float dtype)")
    add("--kv-group-size", type=int, choices=[32, 64, 128],
        help="quantization group of --kv-bits (default: 64, or 32 when 64 does not divide "
        "the model's head size)")
    add("--max-kv-bytes", type=_byte_size, metavar="SIZE",
        help="memory for KV caches: the running batch's and the prefix cache's together; "
        "requests beyond it wait or get 429 (default: half the memory free after loading "
        "the model)")
    add("--prefix-cache-disk-bytes", type=_byte_size, default=16 * 2**30, metavar="SIZE",
        help="disk space for prefix-cache states under --prefix-cache-dir (default: 16GiB)")
    add("--response-store-size", type=int, default=256, metavar="N",
        help="Responses API: how many responses are kept for previous_response_id and "
        "GET /v1/responses/{id}; the least recently used go first (default: 256)")
    add("--log-level", default="info", type=str.lower,
        choices=["debug", "info", "warning", "error"], help="in any case (default: info)")
    add("--chat-template", metavar="FILE",
        help="a Jinja chat template file that replaces the model's own")
    add("--trust-remote-code", action="store_true",
        help="accepted for compatibility; no model code is ever run here: architectures come "
        "from mlx-lm")
    for flag, what in (("--continuous-batching", "continuous batching"),
                       ("--enable-prefix-cache", "the prefix cache"),
                       ("--enable-auto-tool-choice", "tool_choice auto")):
        add(flag, action="store_true", help=f"accepted for compatibility: {what} is always on")
    add("--access-log", action="store_true", help="log every HTTP request")
    return parser


def _byte_size(text: str) -> int:
    try:
        return parse_byte_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _served_names(args: argparse.Namespace) -> tuple[str, ...]:
    if args.served_model_name:
        names = args.served_model_name
    elif args.model is None:
        names = [DEMO_MODEL_NAME]
    else:  # the id as given, and its last part ("Qwen/Qwen3-8B" -> "Qwen3-8B")
        names = [args.model, Path(args.model.rstrip("/")).name]
    return tuple(dict.fromkeys(n for n in names if n))


def _read_chat_template(path: str | None) -> str | None:
    return None if path is None else Path(path).expanduser().read_text()


def _fail(message: str) -> int:
    print(f"swan-serve: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model_flag is not None:
        if args.model is not None and args.model != args.model_flag:
            return _fail(f"MODEL given twice: '{args.model}' and --model '{args.model_flag}'")
        args.model = args.model_flag
    try:
        chat_template = _read_chat_template(args.chat_template)
    except OSError as exc:
        return _fail(f"--chat-template: cannot read {args.chat_template}: {exc.strerror}")
    if args.step_timeout <= 0:
        return _fail("--step-timeout: must be positive")
    from .engine.group import init_group

    distributed = init_group(args.parallel, args.step_timeout)
    if distributed is None and args.parallel:
        return _fail("--parallel needs several ranks: start swan-serve under mlx.launch")
    try:
        model_dir, model_provider = prepare_model(args)
        settings = ServerSettings(
            model_dir=model_dir,
            served_model_names=_served_names(args),
            host=args.host,
            port=args.port,
            api_key=args.api_key or api_key_from_env(),
            cors_origins=tuple(args.cors_origin),
            max_concurrency=args.max_concurrency,
            max_queue=args.max_queue,
            max_tokens_default=args.max_tokens_default,
            max_model_len=args.max_model_len,
            max_n=args.max_n,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024),
            prefill_step_size=args.prefill_step_size,
            dtype=args.dtype,
            tool_call_parser=args.tool_call_parser,
            prefix_cache_bytes=args.prefix_cache_bytes,
            prefix_cache_dir=args.prefix_cache_dir or prefix_cache_dir_from_env(),
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            max_kv_bytes=args.max_kv_bytes,
            prefix_cache_disk_bytes=args.prefix_cache_disk_bytes,
            log_level=args.log_level,
            response_store_size=args.response_store_size,
            chat_template=chat_template,
        )
    except MODEL_ERRORS as exc:
        return _fail(str(exc))
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "argument"
        return _fail(f"{flag}: {first['msg']}")
    try:
        if distributed is not None and distributed.rank > 0:
            code = _serve_follower(settings, model_provider, distributed)
        else:
            code = serve(settings, access_log=args.access_log, model_provider=model_provider,
                         distributed=distributed)
    except KeyboardInterrupt:  # Ctrl-C while uvicorn was not yet (or no longer) handling it
        code = 130
    _exit_skipping_native_teardown(code)
    return code  # not reached


def _exit_skipping_native_teardown(code: int) -> None:
    """End the process once the server has shut down and saved what it keeps.

    Native threads that MLX started can abort the interpreter's final teardown
    ("terminate called without an active exception", SIGABRT) after all work is done;
    by now every file is written and closed, so that teardown is skipped.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _log_format(distributed: Distributed | None) -> str:
    rank = f"rank {distributed.rank} " if distributed is not None else ""
    return f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s"


def _serve_follower(settings: ServerSettings, model_provider: ModelProvider | None,
                    distributed: Distributed) -> int:
    """A rank other than 0: no HTTP, the engine in lockstep with rank 0."""
    from .engine.distributed import run_follower
    from .engine.engine import Engine

    logging.basicConfig(level=settings.log_level.upper(), format=_log_format(distributed))
    return run_follower(Engine(settings, model_provider, distributed))


def serve(
    settings: ServerSettings, access_log: bool = False, model_provider: ModelProvider | None = None,
    distributed: Distributed | None = None,
) -> int:
    import uvicorn

    from .app import Server, create_app

    logging.basicConfig(level=settings.log_level.upper(), format=_log_format(distributed))
    failures: list[str] = []
    server: Server | None = None

    def on_engine_failure(message: str) -> None:
        failures.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_engine_failure=on_engine_failure,
                     model_provider=model_provider, distributed=distributed)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=access_log,
                            timeout_graceful_shutdown=5)
    server = Server(config)
    server.run()
    if failures:
        print(f"swan-serve: error: {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

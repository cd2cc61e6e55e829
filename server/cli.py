"""swan-serve: serve a local MLX model over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from swan_serve import DEMO_MODEL_DIR

from .settings import API_KEY_ENV, ServerSettings, api_key_from_env


class ModelNotFound(Exception):
    """MODEL does not name something this version can serve; the message says why."""


def resolve_model_dir(model: str | None) -> Path:
    """MODEL argument -> local model directory. The one place a model source is decided.

    Today: a local directory holding config.json and *.safetensors (an MLX checkpoint or an
    unquantized HF checkpoint mlx_lm loads directly), or nothing for the bundled demo model.
    The quantize-and-cache step (Hugging Face ids) will plug in here.
    """
    if model is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ModelNotFound(
                f"no MODEL given and the bundled demo model is not built yet ({DEMO_MODEL_DIR}); "
                "pass a local model directory"
            )
        return DEMO_MODEL_DIR
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} has no config.json; it is not a model directory")
        if not any(path.glob("*.safetensors")):
            raise ModelNotFound(f"{path} has no *.safetensors weights")
        return path.resolve()
    if path.exists():
        raise ModelNotFound(f"{path} is a file; MODEL must be a model directory")
    if _looks_like_hub_id(model):
        raise ModelNotFound(
            f"'{model}' is not a local directory; Hugging Face model ids are not supported "
            "yet: download the model and pass its directory"
        )
    raise ModelNotFound(f"no such model directory: {path}")


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swan-serve",
        description="Serve a local MLX model over an OpenAI-compatible API "
        "(/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics).",
    )
    add = parser.add_argument
    add("model", nargs="?", metavar="MODEL",
        help="local model directory (default: the bundled demo model)")
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
    add("--served-model-name", action="append", default=[], metavar="NAME",
        help="model id(s) clients use; the first is reported (repeatable; default: the "
        "directory name and MODEL as given)")
    add("--max-tokens-default", type=int, default=512,
        help="max_tokens when a request gives none (default: 512)")
    add("--max-model-len", type=int, help="context length (default: from the model config)")
    add("--max-n", type=int, default=8, help="largest n a request may ask for (default: 8)")
    add("--max-body-mb", type=float, default=4.0,
        help="largest request body in MiB (default: 4)")
    add("--prefill-step-size", type=int, default=512,
        help="prompt tokens per engine step (default: 512)")
    add("--dtype", default="auto", choices=["auto", "model", "float32", "float16", "bfloat16"],
        help="compute dtype for float parameters; auto measures float32 against the model "
        "dtype on CPU devices and keeps the model dtype on GPUs (default: auto)")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add("--access-log", action="store_true", help="log every HTTP request")
    return parser


def _served_names(args: argparse.Namespace, model_dir: Path) -> tuple[str, ...]:
    names = args.served_model_name or [model_dir.name, *([args.model] if args.model else [])]
    return tuple(dict.fromkeys(names))


def _fail(message: str) -> int:
    print(f"swan-serve: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Serving never reaches out to the Hugging Face hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model_dir = resolve_model_dir(args.model)
        settings = ServerSettings(
            model_dir=model_dir,
            served_model_names=_served_names(args, model_dir),
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
            log_level=args.log_level,
        )
    except ModelNotFound as exc:
        return _fail(str(exc))
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "argument"
        return _fail(f"{flag}: {first['msg']}")
    return serve(settings, access_log=args.access_log)


def serve(settings: ServerSettings, access_log: bool = False) -> int:
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failures: list[str] = []
    server: uvicorn.Server | None = None

    def on_engine_failure(message: str) -> None:
        failures.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_engine_failure=on_engine_failure)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=access_log,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run()
    if failures:
        print(f"swan-serve: error: {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

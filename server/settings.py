"""Server settings: one validated object built from the command line (and a few env vars)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The API key may come from the environment so that it does not show in `ps`.
API_KEY_ENV = "SWAN_SERVE_API_KEY"

# Where the prefix cache keeps the states it evicts from memory (--prefix-cache-dir).
PREFIX_CACHE_DIR_ENV = "SWAN_SERVE_PREFIX_CACHE_DIR"

ComputeDtype = Literal["auto", "model", "float32", "float16", "bfloat16"]


class ServerSettings(BaseModel):
    """Everything the app and the engine need to know, frozen once the server starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The local model directory, when known before start-up; None when the engine's model
    # provider finds or builds it (quantize-once cache) after the server is listening.
    model_dir: Path | None = None
    served_model_names: tuple[str, ...] = Field(min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    # Sequences decoded together; past it requests wait in a bounded queue.
    max_concurrency: int = Field(8, ge=1, le=1024)
    # Sequences allowed to wait for a decode slot; past it requests get 429.
    max_queue: int = Field(64, ge=0)
    max_tokens_default: int = Field(512, ge=1)
    # Context length override; by default read from the model's config.json.
    max_model_len: int | None = Field(None, ge=1)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_n: int = Field(8, ge=1)
    # Prompt tokens processed per engine step; smaller = quicker cancellation and
    # fairer interleaving with decoding, larger = faster long-prompt prefill.
    prefill_step_size: int = Field(512, ge=16)
    dtype: ComputeDtype = "auto"
    # Tool-call format: "auto" (from the chat template), "none", or a format name.
    tool_call_parser: str = "auto"
    # Bytes of KV states the prefix cache may hold in memory; None: no cap of its own (the
    # KV memory the running batch leaves, see max_kv_bytes); 0: no prefix cache.
    prefix_cache_bytes: int | None = Field(None, ge=0)
    # None: the prefix cache lives in memory only; else evicted states are kept here.
    prefix_cache_dir: Path | None = Field(default_factory=lambda: prefix_cache_dir_from_env())
    # Attention KV of the running batch and the prefix cache stored quantized (None: float).
    kv_bits: Literal[4, 8] | None = None
    # Its quantization group; None: 64, or 32 when 64 does not divide the head size.
    kv_group_size: Literal[32, 64, 128] | None = None
    # Bytes the running batch's KV caches and the prefix cache's memory tier may use
    # together; None: half the memory free once the model is loaded.
    max_kv_bytes: int | None = Field(None, ge=1)
    # Bytes the prefix cache may keep on disk under prefix_cache_dir.
    prefix_cache_disk_bytes: int = Field(16 * 2**30, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Responses API: how many stored responses `previous_response_id` can continue.
    response_store_size: int = Field(256, ge=0)
    # A Jinja chat template that replaces the model's own (--chat-template).
    chat_template: str | None = None

    @property
    def model_id(self) -> str:
        """The id reported as `model` in responses: the first served name."""
        return self.served_model_names[0]


_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
               "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
               "tib": 2**40}


def parse_byte_size(text: str) -> int:
    """'2GiB', '512MB', '1.5g', '1000000' -> bytes (argparse `type`)."""
    value = text.strip().lower()
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = value[len(number):].strip()
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in _BYTE_UNITS or amount < 0:
        raise ValueError(f"not a size in bytes: {text!r} (e.g. 2GiB, 512MB, 0)")
    return int(amount * _BYTE_UNITS[unit])


def prefix_cache_dir_from_env() -> Path | None:
    folder = os.environ.get(PREFIX_CACHE_DIR_ENV, "").strip()
    return Path(folder).expanduser() if folder else None


def api_key_from_env() -> str | None:
    key = os.environ.get(API_KEY_ENV, "").strip()
    return key or None

"""Load a local MLX model directory and pick the dtype it computes in on this device.

Imported only on the generation thread (mlx_lm takes seconds to import and MLX arrays
belong to the thread that evaluates them). Loads with mlx_lm's local loaders, never its
`load()`, which would try the Hugging Face hub for anything that is not a directory.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.utils import load_model, load_tokenizer

if TYPE_CHECKING:
    from .group import Distributed

log = logging.getLogger("swan_serve.engine")

# float32 must beat the model dtype by this factor before we pay its memory.
_FLOAT32_MIN_SPEEDUP = 1.25
# Decode batch sizes the dtype probe times (summed): one stream and a small batch.
_PROBE_ROWS = (1, 8)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    context_length: int | None
    vocab_size: int
    model_dtype: str
    compute_dtype: str
    # The checkpoint's recommended sampling (generation_config.json), used for fields a
    # request leaves out.
    sampling_defaults: dict[str, float]


def load_local_model(model_dir: Path, dtype: str, max_model_len: int | None,
                     parallel: Distributed | None = None,
                     chat_template: str | None = None) -> LoadedModel:
    """`parallel`: this process is one rank of several; it keeps only its shard.
    `chat_template`: replaces the model's own (--chat-template)."""
    model, config = load_model(model_dir, lazy=True)
    if parallel is not None:
        parallel.shard(model)  # before anything is read: each rank reads only its part
    _check_batchable(model)
    extra = {"chat_template": chat_template} if chat_template is not None else None
    tokenizer = load_tokenizer(model_dir, extra, eos_token_ids=config.get("eos_token_id"))
    model_dtype = _float_param_dtype(model)
    target = choose_compute_dtype(model, dtype, model_dtype)
    if parallel is not None:  # every rank computes in rank 0's choice
        target = getattr(mx, parallel.agree_dtype(_dtype_name(target)), None)
    if target is not None and target != model_dtype:
        model.set_dtype(target)
    compute = target or model_dtype
    _check_experts_run(model, compute)
    mx.eval(model.parameters())
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        context_length=max_model_len or _context_length(config),
        vocab_size=_vocab_size(config, tokenizer),
        model_dtype=_dtype_name(model_dtype),
        compute_dtype=_dtype_name(compute),
        sampling_defaults=_sampling_defaults(model_dir),
    )


def _check_batchable(model: nn.Module) -> None:
    """Continuous batching merges per-sequence KV caches; a few architectures' caches
    cannot be merged, and one-request-at-a-time serving is not what this server is for."""
    kinds = {type(cache).__name__ for cache in make_prompt_cache(model)
             if not hasattr(cache, "merge")}
    if kinds:
        raise ValueError(f"this architecture's KV cache ({', '.join(sorted(kinds))}) "
                         "cannot be batched, so swan-serve cannot serve it yet")


def choose_compute_dtype(
    model: nn.Module, requested: str, model_dtype: mx.Dtype | None
) -> mx.Dtype | None:
    """The dtype to cast float parameters to, or None to keep the checkpoint's.

    `auto` keeps the model dtype on GPUs. On a CPU device it times the model's largest
    linear layer in the model dtype and in float32, for one row (single-stream decode) and
    a batch of rows (batched decode), and casts when float32 is clearly faster overall: on
    mlx's CPU build bf16/fp16 quantized matmuls are ~9x slower than float32, while dense
    bf16 can win once rows are batched.
    """
    if requested == "model" or model_dtype is None:
        return None
    if requested != "auto":
        return getattr(mx, requested)
    if mx.default_device().type != mx.DeviceType.cpu or model_dtype == mx.float32:
        return None
    if _has_dense_experts(model) and not _gather_mm_runs(model_dtype):
        return mx.float32  # the only dtype this device's gather_mm computes in
    layer = _largest_linear(model)
    if layer is None:
        return None
    native = sum(_time(_layer_call(layer, model_dtype, rows)) for rows in _PROBE_ROWS)
    wide = sum(_time(_layer_call(layer, mx.float32, rows)) for rows in _PROBE_ROWS)
    log.info(
        "dtype probe on the CPU (rows %s): %s %.2f ms, float32 %.2f ms",
        _PROBE_ROWS,
        _dtype_name(model_dtype), native * 1e3, wide * 1e3,
    )
    return mx.float32 if wide * _FLOAT32_MIN_SPEEDUP < native else None


def _has_dense_experts(model: nn.Module) -> bool:
    """Unquantized mixture-of-experts layers (they run on gather_mm)."""
    return any(isinstance(m, SwitchLinear) for _, m in model.named_modules())


def _gather_mm_runs(dtype: mx.Dtype) -> bool:
    """Whether gather_mm computes in `dtype` on this device (mlx's CPU build: float32 only)."""
    a, b = mx.ones((1, 1, 4), dtype=dtype), mx.ones((2, 4, 4), dtype=dtype)
    try:
        mx.eval(mx.gather_mm(a, b, rhs_indices=mx.array([1], dtype=mx.uint32)))
    except (RuntimeError, ValueError):
        return False
    return True


def _check_experts_run(model: nn.Module, dtype: mx.Dtype | None) -> None:
    if dtype is not None and _has_dense_experts(model) and not _gather_mm_runs(dtype):
        raise ValueError(
            f"this model's unquantized experts cannot compute in {_dtype_name(dtype)} on "
            f"this device (mlx's gather_mm needs float32 here); use --dtype auto or float32"
        )


def _layer_call(layer: nn.Module, dtype: mx.Dtype, rows: int) -> Callable[[], mx.array]:
    """A decode-shaped call of `layer` (`rows` tokens) with its float parts in `dtype`."""
    if isinstance(layer, nn.QuantizedLinear):
        in_dims = layer.weight.shape[-1] * 32 // layer.bits
        scales = layer.scales.astype(dtype)
        biases = getattr(layer, "biases", None)
        biases = None if biases is None else biases.astype(dtype)
        x = mx.random.normal((rows, in_dims)).astype(dtype)
        mx.eval(x, scales, biases, layer.weight)
        return lambda: mx.quantized_matmul(
            x, layer.weight, scales, biases, transpose=True,
            group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
        )
    weight = layer.weight.astype(dtype)
    x = mx.random.normal((rows, weight.shape[-1])).astype(dtype)
    mx.eval(x, weight)
    return lambda: x @ weight.T


def _time(call: Callable[[], mx.array], repeats: int = 3) -> float:
    mx.eval(call())  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(call())
        best = min(best, time.perf_counter() - start)
    return best


def _largest_linear(model: nn.Module) -> nn.Module | None:
    linears = [
        m for _, m in model.named_modules()
        if isinstance(m, nn.QuantizedLinear | nn.Linear)
    ]
    return max(linears, key=lambda m: m.weight.size, default=None)


def _float_param_dtype(model: nn.Module) -> mx.Dtype | None:
    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    return None


def _dtype_name(dtype: mx.Dtype | None) -> str:
    return "none" if dtype is None else str(dtype).removeprefix("mlx.core.")


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def _context_length(config: dict) -> int | None:
    text = _text_config(config)
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        if isinstance(text.get(key), int):
            return text[key]
    return None


_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _sampling_defaults(model_dir: Path) -> dict[str, float]:
    path = model_dir / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if config.get("do_sample") is False:
        return {"temperature": 0.0}
    return {
        key: config[key] for key in _SAMPLING_KEYS
        if isinstance(config.get(key), int | float) and not isinstance(config.get(key), bool)
    }


def _vocab_size(config: dict, tokenizer: Any) -> int:
    size = _text_config(config).get("vocab_size")
    return size if isinstance(size, int) else len(tokenizer)

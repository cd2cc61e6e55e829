"""How far a quantized model is from its reference, on held-out text.

Per token position: KL(REF || QUANT) of the next-token distributions, whether
both put the same token first (top-1 agreement), and each model's negative
log-likelihood of the actual next token (-> perplexity). The text is cut into
windows of `seq_len + 1` tokens and run in batches; the reference and every
quantized model see the same windows, so one reference pass serves many
quantized models (bench/quality.py compares seven at once).

By default both models compute in float32 (quantized scales/biases upcast;
the packed weights are untouched), so the figures measure the weights, not
bf16 arithmetic noise; `dtype="model"` keeps each model's own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from tqdm import tqdm

DEFAULT_SEQ_LEN = 256
DEFAULT_MAX_TOKENS = 16384
_LOGIT_BUDGET = 1 << 25  # batch * seq_len * vocab floats held at once


class EvalError(ValueError):
    """Models or text that cannot be compared; one line for the user."""


@dataclass(frozen=True)
class EvalResult:
    tokens: int  # positions scored
    kl_mean: float
    kl_p99: float
    ppl_ref: float
    ppl_quant: float
    top1: float  # fraction of positions where both argmaxes agree


def default_text(max_chars: int = 400_000) -> str:
    """Text the demo model did not train on (held-out standard-library source)."""
    from .fixtures.corpus import heldout_text

    return heldout_text(max_chars)


def load_model(path: str | Path, dtype: str = "float32"):
    """(model, tokenizer) through stock mlx_lm, optionally upcast to float32."""
    from mlx_lm import load

    model, tokenizer = load(str(path))
    if dtype == "float32":
        model.update(tree_map(_upcast, model.parameters()))
    elif dtype != "model":
        raise EvalError(f"dtype must be 'float32' or 'model', got {dtype!r}")
    return model, tokenizer


def windows(tokenizer, text: str, seq_len: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping [n, seq_len + 1] token windows (input + shifted targets)."""
    with _quiet_transformers():  # it warns that the text exceeds the model's context
        ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
    count = min(len(ids) - 1, max_tokens) // seq_len
    if count < 1:
        raise EvalError(f"the text has {len(ids)} tokens; need more than {seq_len}")
    return np.stack([ids[i * seq_len : (i + 1) * seq_len + 1] for i in range(count)])


def compare(
    ref: nn.Module,
    quantized: dict[str, nn.Module],
    data: np.ndarray,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, EvalResult]:
    """Score every quantized model against `ref` on the token windows `data`."""
    seq_len = data.shape[1] - 1
    acc = {name: _Accumulator() for name in quantized}
    ref_nll: list[np.ndarray] = []
    batch = batch_size
    with tqdm(total=len(data), unit="window", desc="eval", disable=not progress) as bar:
        start = 0
        while start < len(data):
            chunk = mx.array(data[start : start + (batch or 1)])
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
            lp_ref = _log_probs(ref(inputs))
            if batch is None:  # size batches from the vocabulary, once known
                batch = max(1, _LOGIT_BUDGET // (seq_len * lp_ref.shape[-1]))
            ref_nll.append(np.array(_nll(lp_ref, targets)).ravel())
            ref_top = mx.argmax(lp_ref, axis=-1)
            for name, model in quantized.items():
                lp_q = _log_probs(model(inputs))
                if lp_q.shape != lp_ref.shape:
                    raise EvalError(f"{name} predicts {lp_q.shape[-1]} tokens, the reference "
                                    f"{lp_ref.shape[-1]}; not the same model")
                kl = mx.sum(mx.exp(lp_ref) * (lp_ref - lp_q), axis=-1)
                same = mx.argmax(lp_q, axis=-1) == ref_top
                acc[name].add(np.array(kl), np.array(_nll(lp_q, targets)), np.array(same))
            bar.update(chunk.shape[0])
            start += chunk.shape[0]
    ppl_ref = _ppl(np.concatenate(ref_nll))
    return {name: a.result(ppl_ref) for name, a in acc.items()}


def evaluate(
    ref_dir: str | Path,
    quant_dir: str | Path,
    text: str | None = None,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> EvalResult:
    ref, tokenizer = load_model(ref_dir, dtype)
    quant, _ = load_model(quant_dir, dtype)
    if text is None:
        text = default_text(max_chars=max_tokens * 10)  # ~2-4 characters per token
    data = windows(tokenizer, text, seq_len, max_tokens)
    return compare(ref, {"quant": quant}, data, batch_size, progress)["quant"]


def format_table(rows: list[tuple[str, EvalResult]], extra: dict[str, list[str]] | None = None,
                 ) -> str:
    """A plain-text table, one row per model; `extra` adds leading columns."""
    extra = extra or {}
    header = ["model", *extra, "KL mean", "KL p99", "PPL ref", "PPL quant", "top-1", "tokens"]
    body = []
    for i, (label, r) in enumerate(rows):
        body.append([
            label, *(col[i] for col in extra.values()), f"{r.kl_mean:.4f}", f"{r.kl_p99:.4f}",
            f"{r.ppl_ref:.3f}", f"{r.ppl_quant:.3f}", f"{100 * r.top1:.2f}%", str(r.tokens),
        ])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    top = "  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))
    return "\n".join([top, "-" * len(top), *lines])


class _Accumulator:
    def __init__(self) -> None:
        self.kl: list[np.ndarray] = []
        self.nll: list[np.ndarray] = []
        self.same: list[np.ndarray] = []

    def add(self, kl: np.ndarray, nll: np.ndarray, same: np.ndarray) -> None:
        self.kl.append(kl.ravel())
        self.nll.append(nll.ravel())
        self.same.append(same.ravel())

    def result(self, ppl_ref: float) -> EvalResult:
        kl = np.maximum(np.concatenate(self.kl).astype(np.float64), 0.0)  # clip float noise
        return EvalResult(
            tokens=int(kl.size),
            kl_mean=float(kl.mean()),
            kl_p99=float(np.percentile(kl, 99)),
            ppl_ref=ppl_ref,
            ppl_quant=_ppl(np.concatenate(self.nll)),
            top1=float(np.concatenate(self.same).mean()),
        )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _upcast(p: mx.array) -> mx.array:
    return p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p


def _log_probs(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _nll(log_probs: mx.array, targets: mx.array) -> mx.array:
    return -mx.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _ppl(nll: np.ndarray) -> float:
    return math.exp(float(nll.astype(np.float64).mean()))

"""What storing the attention KV quantized (`--kv-bits`) costs in quality.

One forward pass over a text with float KV caches and one with quantized ones: the same
weights, the same tokens, so the difference between the two next-token distributions at
every position is the KV quantization alone. Quantization is per position (groups run
along the head dimension), so a single pass gives what chunked prefill and token-by-token
decoding would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .quantized_kv import make_cache

# Mean KL (nats per token) that quantized KV must stay under on the trained test models;
# bench/kv.py measures the actual values (about 2e-4 at 8 bits and 0.06 at 4 on the
# one-layer tool models, whose prompt positions are untrained).
KL_BOUNDS = {8: 1e-3, 4: 0.1}


@dataclass(frozen=True)
class KVQuality:
    positions: int
    mean_kl: float  # KL(float KV || quantized KV), nats per position
    max_kl: float
    top1_agreement: float  # share of positions where both rank the same token first


def _log_probs(model: Any, tokens: list[int], cache: list[Any]) -> mx.array:
    logits = model(mx.array([tokens]), cache=cache)[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def kv_quality(model: Any, tokens: list[int], bits: int, group_size: int) -> KVQuality:
    reference = _log_probs(model, tokens, make_cache(model, None, group_size))
    quantized = _log_probs(model, tokens, make_cache(model, bits, group_size))
    kl = mx.sum(mx.exp(reference) * (reference - quantized), axis=-1)
    same = mx.argmax(reference, axis=-1) == mx.argmax(quantized, axis=-1)
    kl_np = np.array(kl)
    return KVQuality(len(tokens), float(kl_np.mean()), float(kl_np.max()),
                     float(np.array(same).mean()))

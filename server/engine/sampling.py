"""Per-sequence samplers and logits processors.

Every sampled (temperature > 0) sequence owns its random key, so a seeded request gives the
same tokens whatever else shares the batch: nothing reads the global MLX random state.
Greedy sequences share one sampler object, which lets mlx_lm's GenerationBatch sample them
in a single batched call.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

from .generation import SamplingParams

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


class KeyedSampler:
    """Temperature / top-p / min-p / top-k sampling driven by a private random key."""

    def __init__(self, key: mx.array, params: SamplingParams, vocab_size: int):
        self._key = key
        self._inv_temperature = 1.0 / params.temperature
        self._top_p = params.top_p
        self._min_p = params.min_p
        # top_k >= vocab keeps every token: skip it (mlx_lm's apply_top_k rejects it).
        self._top_k = params.top_k if 0 < params.top_k < vocab_size else 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        self._key, step_key = mx.random.split(self._key)
        if 0 < self._top_p < 1:
            logprobs = apply_top_p(logprobs, self._top_p)
        if self._min_p > 0:
            logprobs = apply_min_p(logprobs, self._min_p)
        if self._top_k > 0:
            logprobs = apply_top_k(logprobs, self._top_k)
        return mx.random.categorical(logprobs * self._inv_temperature, key=step_key)


def make_sampler(params: SamplingParams, choice_index: int, vocab_size: int) -> Sampler:
    if params.temperature == 0:
        return greedy_sampler
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    key = mx.random.key(seed)
    if choice_index > 0:
        # Choice i of a seeded n>1 request: distinct but reproducible.
        key = mx.random.split(key, num=choice_index + 1)[choice_index]
    return KeyedSampler(key, params, vocab_size)


def make_logits_processors(params: SamplingParams, prompt_len: int) -> list[LogitsProcessor]:
    """Processors see the sequence's whole context (prompt + generated) as `tokens`."""
    processors: list[LogitsProcessor] = []
    if params.logit_bias:
        processors.append(_logit_bias(params.logit_bias))
    if params.repetition_penalty != 1.0:
        processors.append(_repetition_penalty(params.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty:
        processors.append(
            _output_penalties(params.presence_penalty, params.frequency_penalty, prompt_len)
        )
    return processors


def _logit_bias(bias: tuple[tuple[int, float], ...]) -> LogitsProcessor:
    indices = mx.array([token for token, _ in bias])
    values = mx.array([value for _, value in bias])

    def apply(_tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, indices].add(values.astype(logits.dtype))

    return apply


def _token_counts(tokens: mx.array, vocab_size: int, dtype: mx.Dtype) -> mx.array:
    return mx.zeros((vocab_size,), dtype=dtype).at[tokens].add(1)


def _repetition_penalty(penalty: float) -> LogitsProcessor:
    """CTRL-style multiplicative penalty on every token seen in prompt or output."""

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        seen = _token_counts(tokens, logits.shape[-1], logits.dtype) > 0
        penalized = mx.where(logits < 0, logits * penalty, logits / penalty)
        return mx.where(seen, penalized, logits)

    return apply


def _output_penalties(presence: float, frequency: float, prompt_len: int) -> LogitsProcessor:
    """OpenAI's presence/frequency penalties, counted over generated tokens only."""

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        generated = tokens[prompt_len:]
        if generated.size == 0:
            return logits
        counts = _token_counts(generated, logits.shape[-1], logits.dtype)
        return logits - frequency * counts - presence * (counts > 0).astype(logits.dtype)

    return apply

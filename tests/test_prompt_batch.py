"""MovingPromptBatch: prompts that all move to decoding at once hand their caches over
instead of having them copied, and every batch generates what mlx-lm's own does (lone
prompts, groups whose prompts end together or apart, attention and recurrent caches)."""

from __future__ import annotations

import random
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.utils import load_model

from swan_serve.server.engine.prompt_batch import MovingPromptBatch, use_moving_prompt_batch


@pytest.fixture(scope="module", params=["qwen3", "qwen3_5_moe"])
def model(request, tiny_checkpoint) -> Any:
    model = load_model(tiny_checkpoint(request.param, tokenizer="small"))[0]
    model.set_dtype(mx.float32)  # MLX's CPU expert matmul is float32-only; exact besides
    return model


def generator_for(model: Any, moving: bool) -> BatchGenerator:
    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=8,
                               prefill_batch_size=8, prefill_step_size=16)
    if moving:
        use_moving_prompt_batch(generator)
        assert isinstance(generator._prompt_batch, MovingPromptBatch)
    return generator


def run(generator: BatchGenerator, arrivals: list[list[list[int]]], max_tokens: int
        ) -> dict[int, list[int]]:
    """Greedy tokens per sequence; arrivals[k] are inserted before the k-th step."""
    tokens: dict[int, list[int]] = {}
    step = 0
    while step < len(arrivals) or any(len(t) < max_tokens for t in tokens.values()):
        if step < len(arrivals) and arrivals[step]:
            uids = generator.insert(arrivals[step], max_tokens=[max_tokens] * len(arrivals[step]))
            tokens.update((uid, []) for uid in uids)
        for response in generator.next()[1]:
            tokens[response.uid].append(response.token)
        step += 1
    generator.close()
    return tokens


def prompts(rng: random.Random, lengths: list[int]) -> list[list[int]]:
    return [[rng.randrange(100, 900) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("arrivals", [
    [[40]],  # one prompt, three prefill chunks
    [[40, 40, 40]],  # a group that ends its prompts together
    [[10, 40, 25]],  # a group whose prompts end apart: mlx-lm's split for the early ones
    [[30], [], [12, 12], [5]],  # arrivals while others prefill and decode
])
def test_same_tokens_as_mlx_lm(model: Any, arrivals: list[list[int]]) -> None:
    rng = random.Random(len(arrivals) * 100 + sum(map(sum, arrivals)))
    batches = [prompts(rng, lengths) for lengths in arrivals]
    expected = run(generator_for(model, moving=False), batches, max_tokens=5)
    assert run(generator_for(model, moving=True), batches, max_tokens=5) == expected


def test_a_lone_prompt_hands_its_cache_over(model: Any) -> None:
    generator = generator_for(model, moving=True)
    generator.insert(prompts(random.Random(1), [20]), max_tokens=[3])
    while not generator._generation_batch.uids:
        caches = list(generator._prompt_batch.prompt_cache)
        generator.next()
    moved = generator._generation_batch.prompt_cache
    assert all(a is b for a, b in zip(moved, caches, strict=True))
    assert len(generator._prompt_batch) == 0 and not generator._prompt_batch.prompt_cache
    generator.close()

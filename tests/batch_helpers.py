"""Run sequences the way the server's engine does: one mlx_lm BatchGenerator batch, each
sequence with its own sampler and logits processors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lm.generate import BatchGenerator
from mlx_lm.utils import load_model, load_tokenizer


@dataclass
class Engine:
    model: Any
    tokenizer: Any
    vocab_size: int


def load_engine(path: Path) -> Engine:
    model, config = load_model(path)
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return Engine(model, tokenizer, config["vocab_size"])


def generate(engine: Engine, prompts: list[list[int]], processors: list[list[Any]],
             max_tokens: int, samplers: list[Any] | None = None) -> list[tuple[list[int], str]]:
    """(generated tokens without the end token, finish reason) per prompt, in order."""
    eos = sorted(engine.tokenizer.eos_token_ids)
    generator = BatchGenerator(engine.model, stop_tokens=[[t] for t in eos],
                               completion_batch_size=len(prompts),
                               prefill_batch_size=len(prompts))
    try:
        uids = generator.insert(prompts, max_tokens=[max_tokens] * len(prompts),
                                samplers=samplers, logits_processors=processors)
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        finished: dict[int, str] = {}
        while len(finished) < len(uids):
            _, responses = generator.next()
            for response in responses:
                if response.finish_reason != "stop" or response.token not in eos:
                    tokens[response.uid].append(response.token)
                if response.finish_reason:
                    finished[response.uid] = response.finish_reason
        return [(tokens[uid], finished[uid]) for uid in uids]
    finally:
        generator.close()


class ForceTokens:
    """A logits processor that makes a greedy sequence write `tokens` first: it lifts each
    one far above the rest (a bias, not a mask, so processors after it still decide)."""

    def __init__(self, tokens: list[int], lift: float = 1e4):
        self._tokens = tokens
        self._lift = lift
        self._start: int | None = None

    def __call__(self, context: Any, logits: Any) -> Any:
        if self._start is None:
            self._start = context.shape[-1]
        step = context.shape[-1] - self._start
        if step >= len(self._tokens):
            return logits
        return logits.at[:, self._tokens[step]].add(self._lift)

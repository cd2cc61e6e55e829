"""BatchGenerator's prompt batch, minus a copy of every prompt's KV cache when all of them
move to decoding at once.

mlx-lm's PromptProcessingBatch.split deep-copies the whole batch's caches, then keeps the
moving rows of the copy and the staying rows of the original: for a 32k-token conversation
on an 8B model that is ~5 GB copied in the step that gives its first token (bench/
transition.py on an H200: a new turn's first token in 0.82x the time without that copy).
When every sequence of the batch moves (a lone request, a group whose prompts end
together) nothing stays behind, and the batch's caches can simply change hands.
"""

from __future__ import annotations

import copy
import logging

from mlx_lm.generate import BatchGenerator, PromptProcessingBatch

log = logging.getLogger("swan_serve.engine")


class MovingPromptBatch(PromptProcessingBatch):
    def split(self, indices: list[int]) -> PromptProcessingBatch:
        if sorted(indices) != list(range(len(self.uids))):
            return super().split(indices)
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, list):  # the per-sequence lists, the caches among them
                setattr(moved, name, list(value))
        self.filter([])  # empties this batch's own lists; the moved batch keeps its copies
        return moved


def use_moving_prompt_batch(generator: BatchGenerator) -> None:
    """Gives a new `generator` a MovingPromptBatch, if its prompt batch is the kind this
    knows (another mlx-lm may differ: then it stays as it is)."""
    batch = getattr(generator, "_prompt_batch", None)
    if type(batch) is not PromptProcessingBatch or len(batch):
        log.debug("mlx-lm's prompt batch is not the expected one: splitting as it does")
        return
    generator._prompt_batch = MovingPromptBatch.empty(
        generator.model, generator.sampler, prefill_step_size=generator.prefill_step_size)

"""Per-input-channel second moments E[x_j^2] of every linear module's input, data-free.

The interface the allocator and the group fit take (and an imatrix file also
produces): a plain ``dict[str, np.ndarray]`` keyed by the HF weight name
("model.layers.0.self_attn.q_proj.weight"), float32, shape [in_features] (or
[n_experts, in_features] for stacked experts).

The estimate here is a self-generated importance matrix: the float model writes
answers to a fixed set of chat prompts through its own chat template (no
dataset), then one forward pass over those conversations records, at every
quantizable module, the mean of x_j^2 over all token positions. A tied embedding
is also the output head: its moments are those of the head's input (the final
norm's output); an untied input embedding is a row lookup, whose error per token
is the row's error, so its moments are flat.

The model runs in numpy (npmodel.py: MLX's CPU matmul is slow), streamed from
the checkpoint a decoder layer at a time (NpModel.stream), so memory stays near
one layer in float32 + the KV cache whatever the model's size. Cost: the
prompts' prefill, 48 decode steps for all 12 prompts together, and one forward
pass over the ~1k tokens of conversation: about 2 * params * 2k FLOPs, ~4 TFLOP
per billion parameters. Each forward call reads every weight once (the head in
vocabulary blocks; no head at all for the recording pass), so this step reads
the model 1 (prefill) + max_new_tokens (decode) + 1 (record) times: 50 reads by
default: 0.8 TB for Qwen3-8B's 16.4 GB of bf16, from the page cache when the
model fits in RAM, from disk when it does not (at 3 GB/s, ~5 s per decode step).
Values are rounded to 4 significant digits so that the same checkpoint on the
same build gives the same bytes downstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .npmodel import NpModel

Moments = dict[str, np.ndarray]

# Generic requests in several registers; the model's own answers are the text.
PROMPTS = (
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of the French Revolution?",
    "Give me three tips for writing clear emails at work.",
    "How do I reverse a list in Python? Show an example.",
    "Describe the water cycle to a ten-year-old.",
    "What is the difference between weather and climate?",
    "Write a polite message declining an invitation to a party.",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "Why is the sky blue?",
    "List some healthy breakfast ideas and explain why they are good.",
    "How does compound interest work? Give a numerical example.",
)


@dataclass(frozen=True)
class MomentOptions:
    max_new_tokens: int = 48  # per prompt
    temperature: float = 0.7  # a little variety; seeded
    seed: int = 0


DEFAULT_OPTIONS = MomentOptions()


def round_sig(x: np.ndarray, digits: int = 4) -> np.ndarray:
    """Round to `digits` significant digits (float32), so tiny float noise vanishes."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    nz = x != 0
    exp = np.floor(np.log10(np.abs(x[nz])))
    scale = 10.0 ** (digits - 1 - exp)
    out[nz] = np.round(x[nz] * scale) / scale
    return out.astype(np.float32)


def conversations(model: NpModel, tokenizer, options: MomentOptions = DEFAULT_OPTIONS,
                  ) -> list[list[int]]:
    """Token ids of each prompt + the model's own answer, through its chat template
    (a model without one continues the bare prompt text)."""
    prompts = []
    for prompt in PROMPTS:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True)
        else:
            ids = tokenizer.encode(prompt)
        prompts.append(list(ids))
    stop = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    answers = model.generate(prompts, options.max_new_tokens, options.temperature,
                             options.seed, stop)
    return [p + a for p, a in zip(prompts, answers, strict=True)]


def record(model: NpModel, sequences: list[list[int]], modules: dict[str, str],
           ) -> Moments:
    """Mean x^2 per channel at each module path of `modules` (path -> HF weight name),
    over every real (not padding) position of `sequences`."""
    longest = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), longest), dtype=np.int64)
    valid = np.zeros(tokens.shape, dtype=bool)
    for i, seq in enumerate(sequences):  # right padding: real positions stay causal
        tokens[i, : len(seq)] = seq
        valid[i, : len(seq)] = True
    sums: dict[str, np.ndarray] = {}
    weight = valid.astype(np.float64)[..., None]

    def hook(path: str, x: np.ndarray) -> None:
        total = np.sum(weight * np.square(x, dtype=np.float64), axis=(0, 1))
        sums[path] = sums.get(path, 0.0) + total

    model.forward(tokens, hook=hook, logits="none")
    count = float(valid.sum())
    out: Moments = {}
    for path, hf_name in modules.items():
        recorded = sums.get(path, sums.get(f"{path}#head"))
        if recorded is not None:
            out[hf_name] = recorded / count
        elif f"{path}.weight" in model.weights:  # an untied input embedding: a row lookup
            out[hf_name] = np.ones(model.weights.shape(f"{path}.weight")[-1])
    return {k: round_sig(v) for k, v in sorted(out.items())}


def self_generated(model_dir: str | Path, options: MomentOptions = DEFAULT_OPTIONS,
                   model_and_tokenizer=None) -> tuple[Moments, list[list[int]]]:
    """(moments keyed by HF weight name, the self-generated token sequences)."""
    from .mlx_names import build_name_map, checkpoint_shapes
    from .sources.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    modules = {t.module: t.sources[0] for t in name_map.quantizable() if len(t.sources) == 1}
    model, tokenizer = model_and_tokenizer or NpModel.stream(model_dir)
    sequences = conversations(model, tokenizer, options)
    return record(model, sequences, modules), sequences


def save(moments: Moments, path: str | Path) -> None:
    np.savez(path, **moments)


def load(path: str | Path) -> Moments:
    with np.load(path) as data:
        return {k: data[k].astype(np.float32) for k in sorted(data.files)}

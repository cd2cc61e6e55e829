"""A new turn on a long cached conversation: mlx-lm's prompt batch against ours.

    .venv/bin/python bench/transition.py                      # small shape, for a CPU
    python bench/transition.py --shape qwen3-8b --contexts 4096 16384 32768   # a GPU

A conversation of `context` tokens is in the prefix cache; the next request adds `suffix`
tokens. BatchGenerator prefills them, then moves the sequence to decoding: mlx-lm's
PromptProcessingBatch.split deep-copies the whole prompt batch's KV cache there, our
MovingPromptBatch (server/prompt_batch.py) hands it over when every sequence moves. For each
context this times insert -> first token, and the peak memory above the cached state, both
ways in alternation on the same model (random weights: only shapes matter here).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import qwen3
from mlx_lm.models.cache import make_prompt_cache

from swan_serve.server.engine.prompt_batch import use_moving_prompt_batch

SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024),
    # Qwen3-8B's config.json.
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936),
}


def build_model(shape: str, dtype: mx.Dtype) -> qwen3.Model:
    args = qwen3.ModelArgs(model_type="qwen3", rms_norm_eps=1e-6, rope_theta=1e6,
                           max_position_embeddings=40960, tie_word_embeddings=False,
                           **SHAPES[shape])
    model = qwen3.Model(args)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def cached_state(model: qwen3.Model, tokens: list[int], chunk: int = 2048) -> list:
    cache = make_prompt_cache(model)
    for start in range(0, len(tokens), chunk):
        model(mx.array([tokens[start:start + chunk]]), cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def first_token(model: qwen3.Model, state: list, context: list[int], suffix: list[int],
                moving: bool) -> tuple[float, float]:
    """(seconds from insert to first token, peak bytes above what was held before)."""
    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=8,
                               prefill_batch_size=8)
    if moving:
        use_moving_prompt_batch(generator)
    # The prefix cache gives each sequence its own cache objects over the stored arrays.
    caches = [copy.copy(layer) for layer in state]
    mx.synchronize()
    mx.reset_peak_memory()
    held = mx.get_active_memory()
    start = time.perf_counter()
    generator.insert_segments([[suffix[:-1], suffix[-1:]]], max_tokens=[2], caches=[caches],
                              all_tokens=[context])
    while not generator.next()[1]:
        pass
    seconds = time.perf_counter() - start
    peak = mx.get_peak_memory() - held
    generator.close()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--suffix", type=int, default=40, help="the new turn's tokens")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    gpu = mx.default_device().type == mx.DeviceType.gpu
    dtype = getattr(mx, args.dtype or ("bfloat16" if gpu else "float32"))
    model = build_model(args.shape, dtype)
    vocab = SHAPES[args.shape]["vocab_size"]
    print(f"device {mx.default_device()}, shape {args.shape}, {dtype}, suffix {args.suffix}, "
          f"median of {args.repeats}\n")
    print("| context | mlx-lm split ms | moving ms | moving / mlx-lm | mlx-lm peak MB "
          "| moving peak MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for context_length in args.contexts:
        tokens = [(i * 7919) % (vocab - 10) + 5 for i in range(context_length + args.suffix)]
        context, suffix = tokens[:context_length], tokens[context_length:]
        state = cached_state(model, context)
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for trial in range(args.repeats + 1):
            for moving in (False, True) if trial % 2 else (True, False):
                result = first_token(model, state, context, suffix, moving)
                if trial:  # the first round warms up
                    runs[moving].append(result)
        ms = {m: statistics.median(s for s, _ in r) * 1000 for m, r in runs.items()}
        mb = {m: max(p for _, p in r) / 2**20 for m, r in runs.items()}
        print(f"| {context_length} | {ms[False]:.1f} | {ms[True]:.1f} | "
              f"{ms[True] / ms[False]:.2f} | {mb[False]:.0f} | {mb[True]:.0f} |", flush=True)
        del state


if __name__ == "__main__":
    main()

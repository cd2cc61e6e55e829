"""Quantized KV and the prefix cache's tiers: capacity, time to first token, quality.

    .venv/bin/python bench/kv.py                       # the tiny fixture: 2k and 8k prefixes
    .venv/bin/python bench/kv.py --prefixes 2048 8192 32768 --repeats 3
    .venv/bin/python bench/kv.py --shape qwen3-0.6b    # a real shape, random weights (a GPU)

One table, three parts:

1. capacity: bytes of one stored prefix state as the server reports it (/metrics after the
   prefix was cached) and how many such prefixes one GiB holds, at float, 8- and 4-bit KV;
   beside them the same arithmetic for the real Qwen3-8B shape (36 layers, 8 KV heads of
   128; bf16 keys and values, or packed values plus a bf16 scale and bias per group).
2. time to first token of a prompt = prefix + a few new tokens, streamed, max_tokens 1:
   recompute (nothing cached), memory hit (the prefix's state in memory), SSD hit (the
   state was evicted to --prefix-cache-dir and is read back). Each (kv setting, prefix)
   gets its own swan-serve whose memory tier holds about one such prefix, so a second
   prompt of the same length pushes the first out to disk. Medians over --repeats, each
   repeat with new random tokens; ratios against recompute side by side in one run.
3. quality: KL(float KV || quantized KV) of the next-token distributions per position and
   top-1 agreement, on the trained tool models' conversations (tests/kv_texts.py) and, when
   present, on SmolLM2-135M's real weights (--real DIR) over held-out text.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import openai  # noqa: E402
from server_process import ServerProcess  # noqa: E402

from swan_serve.quant.fixtures import write_checkpoint  # noqa: E402

SHAPES = {"qwen3-0.6b": "Qwen3-0.6B", "qwen3-8b": "Qwen3-8B"}
KV_SETTINGS = (None, 8, 4)
SUFFIX = 8
GIB = 2**30
QWEN3_8B = {"layers": 36, "kv_heads": 8, "head_dim": 128}


def label(bits: int | None) -> str:
    return "float" if bits is None else f"{bits}-bit"


def bytes_per_token_8b(bits: int | None, group: int = 64) -> float:
    vectors = QWEN3_8B["layers"] * 2 * QWEN3_8B["kv_heads"]
    dim = QWEN3_8B["head_dim"]
    per_vector = dim * 2 if bits is None else dim * bits / 8 + 2 * 2 * dim / group
    return vectors * per_vector


# ------------------------------------------------------------ models


def model_for(args: argparse.Namespace, work: Path) -> Path:
    if args.model:
        return Path(args.model)
    if args.shape:
        config = REPO.parent / "shared" / "models" / SHAPES[args.shape] / "config.json"
        if not config.is_file():
            config = Path("/work/shared/models") / SHAPES[args.shape] / "config.json"
        return write_checkpoint(work / args.shape, "qwen3", config=config, tokenizer="small",
                                overrides={"max_position_embeddings": 40960}, progress=True)
    return write_checkpoint(work / "tiny", "qwen3", tokenizer="small", dtype="float32",
                            overrides={"max_position_embeddings": 40960})


# ------------------------------------------------------------ time to first token


def first_token(client: openai.OpenAI, prompt: list[int]) -> tuple[float, int]:
    """(seconds to the first streamed token, cached_tokens)."""
    started = time.perf_counter()
    stream = client.completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    seconds, cached = None, 0
    for chunk in stream:
        if seconds is None and chunk.choices:
            seconds = time.perf_counter() - started
        if chunk.usage is not None and chunk.usage.prompt_tokens_details:
            cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
    assert seconds is not None
    return seconds, cached


def fresh(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 1000) for _ in range(n)]


def ttft_rows(model: Path, bits: int | None, length: int, repeats: int, per_token: float,
              extra: list[str]) -> dict[str, object]:
    rng = random.Random(length * 31 + (bits or 0))
    times: dict[str, list[float]] = {"recompute": [], "memory": [], "ssd": []}
    state_bytes = 0.0
    with tempfile.TemporaryDirectory() as folder:
        memory = int(per_token * (length + 2 * SUFFIX + 256) * 1.5)  # about one prefix
        kv = ["--kv-bits", str(bits)] if bits else []
        with ServerProcess(model, "--served-model-name", "m", "--prefix-cache-dir", folder,
                           "--prefix-cache-bytes", str(memory), "--max-model-len",
                           str(length + 4 * SUFFIX), *kv, *extra) as server:
            client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-",
                                   max_retries=0, timeout=3600)
            first_token(client, fresh(rng, 64))  # warm-up
            for repeat in range(repeats):
                prefix = fresh(rng, length)
                held = server.metrics()["swan_prefix_cache_bytes"]
                seconds, cached = first_token(client, prefix + fresh(rng, SUFFIX))
                times["recompute"].append(seconds)
                assert cached == 0, cached
                if repeat == 0:  # the state it stored (prompt and its one token)
                    state_bytes = server.metrics()["swan_prefix_cache_bytes"] - held
                seconds, cached = first_token(client, prefix + fresh(rng, SUFFIX))
                assert cached >= length, (cached, length)
                times["memory"].append(seconds)
                spills = server.metrics()["swan_prefix_cache_spills_total"]
                first_token(client, fresh(rng, length + SUFFIX))  # pushes the prefix out
                server.wait_for_metric("swan_prefix_cache_spills_total",
                                       lambda v, s=spills: v > s, 60)
                disk_hits = server.metrics().get(
                    'swan_prefix_cache_tier_hits_total{tier="disk"}', 0)
                seconds, cached = first_token(client, prefix + fresh(rng, SUFFIX))
                assert cached >= length, (cached, length)
                assert server.metrics()[
                    'swan_prefix_cache_tier_hits_total{tier="disk"}'] == disk_hits + 1
                times["ssd"].append(seconds)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"bits": bits, "length": length, "state_bytes": state_bytes, **medians}


# ------------------------------------------------------------ quality


def quality_rows(real: Path | None) -> list[tuple[str, int, object]]:
    from kv_texts import STYLES, conversations, trained_model
    from mlx_lm.utils import load_model

    from swan_serve.server.engine.kv_quality import kv_quality

    rows = []
    for style in STYLES:
        model, _ = load_model(trained_model(style).path)
        tokens = [t for text in conversations(style) for t in text]
        for bits in (8, 4):
            rows.append((f"tool model ({style}), {len(tokens)} positions", bits,
                         kv_quality(model, tokens, bits, 32)))
    if real is not None and (real / "model.safetensors").is_file():
        import mlx.core as mx
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        from swan_serve.quant.evaluate import default_text

        model, _ = load_model(real)
        model.set_dtype(mx.float32)
        tokens = load_tokenizer(real).encode(default_text(20000))[:256]
        for bits in (8, 4):
            rows.append((f"SmolLM2-135M (real weights), {len(tokens)} positions", bits,
                         kv_quality(model, tokens, bits, 64)))
    return rows


# ------------------------------------------------------------ table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local MLX model directory")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a real shape, random weights")
    parser.add_argument("--prefixes", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real", type=Path,
                        default=Path.home() / ".cache" / "swan-serve-bench" / "smollm2",
                        help="SmolLM2-135M as an MLX/HF folder for the real-weights KL row")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("server_args", nargs="*", help="extra swan-serve arguments (after --)")
    args = parser.parse_args()

    from mlx_lm.utils import load_model

    from swan_serve.server.engine.kv_memory import measure_layout

    with tempfile.TemporaryDirectory() as work:
        model = model_for(args, Path(work))
        loaded, _ = load_model(model, lazy=True)
        per_token = {bits: measure_layout(loaded, bits, None).footprint.per_token
                     for bits in KV_SETTINGS}
        del loaded
        rows = [ttft_rows(model, bits, length, args.repeats, per_token[bits], args.server_args)
                for length in args.prefixes for bits in KV_SETTINGS]
    quality = [] if args.no_quality else quality_rows(args.real)

    print(f"\nmodel: {args.model or args.shape or 'tiny qwen3 fixture (float32)'}; "
          f"bytes per token: " + ", ".join(f"{label(b)} {per_token[b]}" for b in KV_SETTINGS))
    kl = {bits: [q.mean_kl for _, b, q in quality if b == bits] for bits in (8, 4)}
    print("\n| prefix | KV | state (MiB) | prefixes per GiB | Qwen3-8B shape: per GiB "
          "| TTFT recompute | TTFT memory hit | TTFT SSD hit | memory / recompute "
          "| SSD / recompute | mean KL vs float (per text) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        length, bits = row["length"], row["bits"]
        big = GIB / (bytes_per_token_8b(bits) * length)
        print(f"| {length} | {label(bits)} | {row['state_bytes'] / 2**20:.2f} "
              f"| {GIB / row['state_bytes']:.0f} | {big:.2f} "
              f"| {row['recompute'] * 1000:.0f} ms | {row['memory'] * 1000:.0f} ms "
              f"| {row['ssd'] * 1000:.0f} ms | {row['memory'] / row['recompute']:.2f} "
              f"| {row['ssd'] / row['recompute']:.2f} "
              f"| {' / '.join(f'{v:.1e}' for v in kl.get(bits, [])) or '0'} |")
    if quality:
        print("\n| text | KV | mean KL (nats) | max KL | top-1 agreement |")
        print("|---|---|---:|---:|---:|")
        for name, bits, q in quality:
            print(f"| {name} | {bits}-bit | {q.mean_kl:.2e} | {q.max_kl:.2e} "
                  f"| {q.top1_agreement:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "quality": [
            (n, b, q.__dict__) for n, b, q in quality]}, indent=1))


if __name__ == "__main__":
    main()

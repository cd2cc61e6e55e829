"""Quantized KV (--kv-bits) and admission by KV memory (--max-kv-bytes) in the real server.

Quantized KV: the batched cache gives the tokens a single sequence on mlx-lm's own
QuantizedKVCache gives, for sequences of different lengths decoded together; a prefix-cache
hit works on quantized states (dense and hybrid). Admission: a burst of long prompts beyond
the budget gets 429 with Retry-After, never a crash, and under a random workload with
quantized KV the batch's caches and the prefix cache stay within the budget.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import mlx.core as mx
import openai
import pytest
from mlx_lm import load
from mlx_lm.models.cache import QuantizedKVCache
from server_process import ServerProcess, eos_token_ids

MODEL = "tiny"
COMMON = ("--served-model-name", MODEL, "--dtype", "float32")


def client_of(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def complete(client: openai.OpenAI, prompt: list[int], max_tokens: int, banned: list[int]
             ) -> tuple[str, int]:
    """(text, cached_tokens) of a greedy completion of exactly max_tokens tokens."""
    result = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
        logit_bias={str(t): -100 for t in banned})
    text = result.choices[0].text
    cached = result.usage.prompt_tokens_details.cached_tokens if \
        result.usage.prompt_tokens_details else 0
    return text, cached


def reference(model_dir: Path, prompt: list[int], max_tokens: int, bits: int,
              banned: list[int]) -> list[int]:
    """Greedy tokens of one sequence on mlx-lm's QuantizedKVCache (group 32 fits head 32)."""
    model, _ = load(str(model_dir))
    cache = [QuantizedKVCache(group_size=32, bits=bits) for _ in model.layers]
    inputs, out = mx.array([prompt]), []
    for _ in range(max_tokens):
        logits = model(inputs, cache=cache)[0, -1]
        logits[mx.array(banned)] = -mx.inf
        out.append(int(mx.argmax(logits).item()))
        inputs = mx.array([[out[-1]]])
    return out


@pytest.fixture(scope="module")
def dense(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen3", tokenizer="small", dtype="float32")


@pytest.mark.parametrize("bits", [8, 4])
def test_batched_quantized_kv_gives_the_single_sequence_tokens(dense: Path, bits: int) -> None:
    banned = eos_token_ids(dense)
    prompts = [list(range(40, 40 + n)) for n in (9, 150, 420)]
    with ServerProcess(dense, *COMMON, "--kv-bits", str(bits), "--prefill-step-size",
                       "128") as server:
        client = client_of(server)
        results: dict[int, tuple[list[int], int]] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, complete(client, prompts[i], 12, banned))) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        again = complete(client, prompts[2], 12, banned)
    tokenizer = load(str(dense))[1]
    for i, prompt in enumerate(prompts):
        expected = tokenizer.decode(reference(dense, prompt, 12, bits, banned))
        assert results[i][0] == expected, f"prompt {i}"
    # The prompt's state, stored quantized, gives the same tokens again.
    assert again[1] == len(prompts[2]) - 1
    assert again[0] == results[2][0]


def test_hybrid_model_keeps_recurrent_states_and_hits_the_cache(tiny_checkpoint) -> None:
    model = tiny_checkpoint("qwen3_5_moe", tokenizer="small")
    banned = eos_token_ids(model)
    prompt = list(range(300, 420))
    with ServerProcess(model, *COMMON, "--kv-bits", "4") as server:
        first = complete(client_of(server), prompt, 6, banned)
        again = complete(client_of(server), prompt, 6, banned)
    assert again == (first[0], len(prompt) - 1)


def test_kv_bits_that_do_not_fit_the_heads_fail_with_one_line(dense: Path) -> None:
    server = ServerProcess(dense, *COMMON, "--kv-bits", "8", "--kv-group-size", "64")
    with pytest.raises(RuntimeError) as failed:
        server.start()
    assert "swan-serve: error: --kv-bits 8: --kv-group-size 64 does not divide" in str(failed.value)


def per_token_bytes(bits: int | None) -> int:
    """The tiny Qwen3's KV per position: 2 layers x (keys, values) x 2 heads x 32 dims."""
    vectors = 2 * 2 * 2
    return vectors * (32 * 4 if bits is None else 32 * bits // 8 + 2 * 4)


def test_a_burst_beyond_the_budget_gets_429_never_a_crash(dense: Path) -> None:
    prompt_len, max_tokens = 700, 16
    one = per_token_bytes(None) * 768  # reach 716 rounds up to the cache's 256 steps
    with ServerProcess(dense, *COMMON, "--max-kv-bytes", str(3 * one)) as server:
        client = client_of(server)
        statuses: list[int] = []
        retry_after: list[str | None] = []

        def ask(seed: int) -> None:
            prompt = [random.Random(seed).randrange(10, 1000) for _ in range(prompt_len)]
            try:
                client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                          temperature=0)
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)
                retry_after.append(exc.response.headers.get("retry-after"))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert set(statuses) <= {200, 429}, statuses
        assert 200 in statuses, statuses  # some fit the budget
        assert 429 in statuses, statuses  # and the rest were turned away
        assert retry_after and all(r for r in retry_after)
        # One request that could never fit is refused as such, not queued forever.
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt=[5] * 3000, max_tokens=16)
        assert server.health()[0] == 200
        assert server.metrics()["swan_kv_reserved_bytes"] == 0


def test_budget_holds_under_a_random_workload_with_quantized_kv(dense: Path) -> None:
    budget = per_token_bytes(4) * 256 * 12
    rng = random.Random(7)
    with ServerProcess(dense, *COMMON, "--kv-bits", "4", "--max-kv-bytes", str(budget),
                       "--max-concurrency", "4") as server:
        client = client_of(server)
        worst: list[float] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen = server.metrics()
                worst.append(seen["swan_kv_batch_bytes"] + seen["swan_prefix_cache_bytes"])
                stop.wait(0.02)

        def ask(prompt: list[int], max_tokens: int) -> None:
            try:
                client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                          temperature=0)
            except openai.RateLimitError:
                pass

        watcher = threading.Thread(target=watch)
        watcher.start()
        shared = [rng.randrange(10, 1000) for _ in range(200)]
        threads = []
        for i in range(14):
            tail = [rng.randrange(10, 1000) for _ in range(rng.randrange(5, 500))]
            threads.append(threading.Thread(target=ask, args=(
                (shared if i % 2 else []) + tail, rng.randrange(1, 40))))
            threads[-1].start()
        for thread in threads:
            thread.join()
        stop.set()
        watcher.join()
        assert worst and max(worst) <= budget, (max(worst), budget)
        assert server.metrics()["swan_prefix_cache_bytes"] > 0


def test_chat_turns_reuse_quantized_states_and_the_separator_computed_ahead(dense: Path
                                                                            ) -> None:
    with ServerProcess(dense, *COMMON, "--kv-bits", "8") as server:
        client = client_of(server)
        messages = [{"role": "system", "content": "You are terse. " * 20}]
        cached = []
        for turn in range(3):
            messages.append({"role": "user", "content": f"Question {turn}?"})
            result = client.chat.completions.create(model=MODEL, messages=messages,
                                                    max_tokens=6, temperature=0)
            cached.append(result.usage.prompt_tokens_details.cached_tokens)
            messages.append({"role": "assistant", "content": result.choices[0].message.content})
            server.wait_for_metric("swan_prefix_lookahead_tokens_total",
                                   lambda v, t=turn: v > 0 or t == 2, 10)
        assert cached[0] == 0 and 0 < cached[1] < cached[2], cached
        assert server.metrics()["swan_prefix_lookahead_tokens_total"] > 0

"""The prefix cache in the real server, driven with the openai SDK, for a dense, an MoE and a
hybrid (linear attention + MoE) model: the same tokens with and without the cache, exact
cached_tokens, concurrent requests sharing a prefix, n > 1, /metrics. (The byte budget
under a random workload: test_prefix_cache_states.py and test_prefix_cache.py.)"""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer
from server_process import ServerProcess, eos_token_ids

from swan_serve.server.chat.prompts import turn_separator

MODEL = "tiny"
SYSTEM = "You are a careful agent. Tools: search(query), open(url), edit(path, text). " * 6


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe", "qwen3_5_moe"])
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, arch: str) -> Path:
    return tiny_checkpoint(arch, tokenizer="small")


@pytest.fixture(scope="module")
def servers(model_dir: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """(with the prefix cache, without it), started side by side. Both compute in float32:
    in bf16 a different batch shape rounds differently, and a random-weight model's near-tied
    logits then flip greedy tokens whatever the cache does."""
    common = ("--served-model-name", MODEL, "--dtype", "float32")
    cached = ServerProcess(model_dir, *common, "--prefix-cache-bytes", "64MiB")
    uncached = ServerProcess(model_dir, *common, "--prefix-cache-bytes", "0")
    starter = threading.Thread(target=uncached.start)
    starter.start()
    try:
        with cached:
            starter.join()
            yield cached, uncached
    finally:
        starter.join()
        uncached.stop()


def client_of(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def hit_tokens(server: ServerProcess) -> float:
    return server.metrics()["swan_prefix_cache_hit_tokens_total"]


def conversation(client: openai.OpenAI, system: str, turns: int) -> list[tuple[str, int]]:
    """A multi-turn chat resending its history: (reply, cached_tokens) per turn."""
    messages = [{"role": "system", "content": system}]
    replies = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Step {turn}: look up item {turn * 7}."})
        result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                                temperature=0)
        reply = result.choices[0].message.content
        replies.append((reply, result.usage.prompt_tokens_details.cached_tokens))
        messages.append({"role": "assistant", "content": reply})
    return replies


def test_same_tokens_with_and_without_the_cache(servers) -> None:
    cached, uncached = servers
    before = hit_tokens(cached)
    with_cache = conversation(client_of(cached), SYSTEM, turns=4)
    without = conversation(client_of(uncached), SYSTEM, turns=4)
    assert [reply for reply, _ in with_cache] == [reply for reply, _ in without]
    assert all(count == 0 for _, count in without)
    counts = [count for _, count in with_cache]
    assert counts[0] == 0 and all(count > 0 for count in counts[1:])
    assert counts[1:] == sorted(counts[1:])  # each turn reuses more history
    assert hit_tokens(cached) - before == sum(counts)  # usage and /metrics agree
    assert hit_tokens(uncached) == 0


def complete(client: openai.OpenAI, prompt: list[int], max_tokens: int = 1,
             **kwargs) -> tuple[str, int]:
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, **kwargs)
    return result.choices[0].text, result.usage.prompt_tokens_details.cached_tokens


def test_cached_tokens_are_exact(servers, model_dir: Path, arch: str) -> None:
    cached, _ = servers
    client = client_of(cached)
    rng = random.Random(arch)
    banned = set(eos_token_ids(model_dir))
    ids = [t for t in range(100, 900) if t not in banned]
    prompt = rng.sample(ids, 60)
    forced = ids[0]
    # The state saved when this ends covers the prompt and the forced token.
    assert complete(client, prompt, logit_bias={str(forced): 100})[1] == 0
    assert complete(client, prompt + [forced, ids[1], ids[2]])[1] == len(prompt) + 1
    # The same prompt again: all but its last token, which gives the first logits.
    assert complete(client, prompt)[1] == len(prompt) - 1
    # A prompt that leaves the cached path after 10 tokens: attention caches forget the
    # rest; the recurrent states of the hybrid cannot be cut back and it has none saved
    # at or before token 10.
    other = prompt[:10] + [t for t in ids[3:40] if t != prompt[10]]
    expected = 0 if arch == "qwen3_5_moe" else 10
    assert complete(client, other)[1] == expected


def test_concurrent_requests_sharing_a_prefix_both_hit(servers, arch: str) -> None:
    cached, _ = servers
    client = client_of(cached)
    system = f"[{arch}] " + SYSTEM

    def ask(question: str, into: list[int]) -> None:
        result = client.chat.completions.create(
            model=MODEL, max_tokens=4, temperature=0,
            messages=[{"role": "system", "content": system},
                      {"role": "user", "content": question}])
        into.append(result.usage.prompt_tokens_details.cached_tokens)

    def together(*questions: str) -> list[int]:
        counts: list[int] = []
        threads = [threading.Thread(target=ask, args=(q, counts)) for q in questions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sorted(counts)

    # Cold: whichever comes second waits for the first to save the shared segment (the
    # first reuses at most the template's opening tokens, cached by the other tests).
    first, second = together("Find the first file.", "Open the second link.")
    assert first < len(f"[{arch}]") < len(SYSTEM) // 4 < second
    # Warm: both start from that segment (attention caches: also from the user turn's
    # opening tokens, cut back from the states the first two saved).
    third, fourth = together("Edit the third file.", "Search the fourth term.")
    assert third == fourth >= second


def word_token(tokenizer) -> int:
    """A token that is a whole word of letters and is what that word tokenizes to."""
    return next(i for i in range(tokenizer.vocab_size)
                if (word := tokenizer.decode([i])).isalpha() and len(word) > 2
                and tokenizer.encode(word, add_special_tokens=False) == [i])


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_next_turn_starts_after_the_separator_computed_ahead(servers, model_dir: Path,
                                                             finish: str) -> None:
    cached, uncached = servers
    client = client_of(cached)
    tokenizer = load_tokenizer(model_dir)
    separator = list(turn_separator(tokenizer))
    # The answer is one forced token: the turn end itself (the state then covers it and the
    # rest of the separator is computed ahead), or a word cut off by max_tokens (the whole
    # separator is).
    answer = [separator[0]] if finish == "stop" else [word_token(tokenizer)]
    messages = [{"role": "system", "content": f"{finish}: " + SYSTEM},
                {"role": "user", "content": "Say one word."}]
    lookahead = "swan_prefix_lookahead_tokens_total"
    ahead = cached.metrics()[lookahead]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                           temperature=0, logit_bias={str(answer[0]): 100})
    assert first.choices[0].finish_reason == finish
    computed = len(separator) - 1 if finish == "stop" else len(separator)
    assert cached.wait_for_metric(lookahead, lambda v: v >= ahead + computed,
                                  timeout=30) == ahead + computed
    messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                 {"role": "user", "content": "Another one."}]
    # What the template makes of the next turn starts with the first prompt, the answer and
    # the separator (so the cache can serve all of them)...
    prompt = list(tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True))
    assert len(prompt) == first.usage.prompt_tokens
    covered = prompt + (answer if finish == "length" else []) + separator
    following = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert following[:len(covered)] == covered
    # ... and it does: the separator's tokens are not computed again, and what follows is
    # what the server without a cache generates.
    second, reference = (client_of(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0)
        for server in (cached, uncached))
    assert second.usage.prompt_tokens_details.cached_tokens == len(covered)
    assert second.choices[0].message.content == reference.choices[0].message.content


def test_n_choices_compute_the_prompt_once(servers) -> None:
    cached, uncached = servers
    messages = [{"role": "user", "content": "Name three colours of the sea at night."}]
    before = hit_tokens(cached)
    result = client_of(cached).chat.completions.create(model=MODEL, messages=messages, n=3,
                                                       max_tokens=6, temperature=0)
    reference = client_of(uncached).chat.completions.create(model=MODEL, messages=messages,
                                                            max_tokens=6, temperature=0)
    texts = [choice.message.content for choice in result.choices]
    assert texts == [reference.choices[0].message.content] * 3
    # Choices 2 and 3 started from the prompt state choice 1 saved; usage reports what
    # every choice got from the cache (what the first found: at most the template's
    # opening tokens).
    first = result.usage.prompt_tokens_details.cached_tokens
    assert first < 4
    assert hit_tokens(cached) - before == first + 2 * (result.usage.prompt_tokens - 1)


def test_cache_is_saved_at_shutdown_and_read_at_start(tiny_checkpoint, tmp_path: Path) -> None:
    # The hybrid: its recurrent states go to disk and back as well as its KV caches.
    model = tiny_checkpoint("qwen3_5_moe", tokenizer="small")
    env = {"SWAN_SERVE_PREFIX_CACHE_DIR": str(tmp_path)}
    prompt = list(range(300, 380))
    with ServerProcess(model, "--served-model-name", MODEL, env=env) as server:
        first = complete(client_of(server), prompt, max_tokens=4)
        assert first[1] == 0
        # A clean exit (Ctrl-C: 130), not an abort from MLX work still queued at shutdown.
        code = server.stop()
        assert code in (0, 130, -signal.SIGINT), server.log()
        assert "terminate called" not in server.log()
    assert list(tmp_path.glob("*/*.safetensors"))
    with ServerProcess(model, "--served-model-name", MODEL, env=env) as server:
        again = complete(client_of(server), prompt, max_tokens=4)
        assert again == (first[0], len(prompt) - 1)
        metrics = server.metrics()
        assert metrics["swan_prefix_cache_entries"] > 0
        assert metrics['swan_prefix_cache_tier_hits_total{tier="disk"}'] == 1
        assert metrics["swan_prefix_cache_load_seconds_count"] >= 1

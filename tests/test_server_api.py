"""The real swan-serve process, driven with the official openai SDK: chat and text
completions, streaming, n, logprobs, stop strings, seeds, usage, models, health, metrics."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from server_process import ServerProcess, eos_token_ids, http_get

MODEL = "tiny-qwen3"
ALIAS = "tiny-alias"


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen3", tokenizer="small")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(model_dir, "--served-model-name", MODEL, "--served-model-name", ALIAS,
                       "--max-concurrency", "8") as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def no_eos(model_dir: Path) -> dict[str, int]:
    """logit_bias that bans end-of-sequence tokens: every request runs to max_tokens."""
    return {str(t): -100 for t in eos_token_ids(model_dir)}


def chat(client: openai.OpenAI, content: str = "Tell me a story.", **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kwargs
    )


def test_models_lists_served_names(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, ALIAS]
    assert all(m.object == "model" for m in models.data)


def test_health_is_ok_and_was_loading_first(server: ServerProcess) -> None:
    assert server.health() == (200, {"status": "ok"})
    # The server listened before the model was loaded and said so.
    first_status, first_body = server.health_seen[0]
    assert (first_status, json.loads(first_body)) == (
        503, {"status": "loading", "phase": "load", "progress": 0.0})


def test_chat_non_stream(client: openai.OpenAI, no_eos: dict[str, int]) -> None:
    result = chat(client, max_tokens=8, temperature=0, logit_bias=no_eos)
    assert result.object == "chat.completion"
    assert result.model == MODEL
    assert len(result.choices) == 1
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    usage = result.usage
    assert usage.completion_tokens == 8
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0


def test_alias_and_content_parts(client: openai.OpenAI, no_eos: dict[str, int]) -> None:
    plain = chat(client, "Hello there, friend", max_tokens=6, temperature=0, logit_bias=no_eos)
    parts = client.chat.completions.create(
        model=ALIAS,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello there, "},
                                               {"type": "text", "text": "friend"}]}],
        max_tokens=6, temperature=0, logit_bias=no_eos,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.model == MODEL  # the reported id is the first served name


def test_chat_stream_matches_non_stream(client: openai.OpenAI, no_eos: dict[str, int]) -> None:
    whole = chat(client, max_tokens=10, temperature=0, logit_bias=no_eos)
    chunks = list(chat(client, max_tokens=10, temperature=0, logit_bias=no_eos, stream=True,
                       stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    roles = [c.choices[0].delta.role for c in chunks if c.choices]
    assert roles[0] == "assistant" and not any(roles[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_wire_format(server: ServerProcess, no_eos: dict[str, int]) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 3, "temperature": 0, "stream": True,
                       "logit_bias": no_eos}).encode()
    request = urllib.request.Request(server.base_url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = [line.decode().rstrip("\n") for line in response if line.strip()]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert "usage" not in events[0]  # include_usage was not asked for
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "length"}


def test_completions_stream_and_not(client: openai.OpenAI, no_eos: dict[str, int]) -> None:
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                  logit_bias=no_eos)
    whole = client.completions.create(**kwargs)
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8
    chunks = list(client.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8


def test_n_choices(client: openai.OpenAI, no_eos: dict[str, int]) -> None:
    result = chat(client, n=2, max_tokens=6, temperature=1.0, seed=7, logit_bias=no_eos)
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in result.choices)
    assert result.usage.completion_tokens == 12
    # Each choice samples with its own key: with 6 tokens they practically never agree.
    assert result.choices[0].message.content != result.choices[1].message.content
    streamed = list(chat(client, n=2, max_tokens=6, temperature=1.0, seed=7,
                         logit_bias=no_eos, stream=True))
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in streamed
                       if c.choices and c.choices[0].index == index)
        assert text == result.choices[index].message.content


def test_logprobs(client: openai.OpenAI, no_eos: dict[str, int]) -> None:
    result = chat(client, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
                  logit_bias=no_eos)
    content = result.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == result.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy decoding takes the most likely token.
        assert token.logprob == pytest.approx(values[0])
        assert token.token == token.top_logprobs[0].token
        assert token.bytes == list(token.token.encode())
    streamed = list(chat(client, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
                         logit_bias=no_eos, stream=True))
    entries = [t for c in streamed if c.choices and c.choices[0].logprobs
               for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in entries] == pytest.approx([t.logprob for t in content])


def test_completion_logprobs(client: openai.OpenAI, no_eos: dict[str, int]) -> None:
    result = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4,
                                       temperature=0, logprobs=2, logit_bias=no_eos)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert "".join(logprobs.tokens) == result.choices[0].text
    assert logprobs.text_offset[0] == 0
    assert all(len(top) == 2 for top in logprobs.top_logprobs)


def test_stop_string_is_matched_on_text_and_not_emitted(
    client: openai.OpenAI, no_eos: dict[str, int]
) -> None:
    full = chat(client, max_tokens=16, temperature=0, logit_bias=no_eos).choices[0].message.content
    # A stop string that first appears in the middle of the greedy text.
    start = len(full) // 2
    stop = full[start:start + 3]
    expected = full[:full.index(stop)]
    result = chat(client, max_tokens=16, temperature=0, logit_bias=no_eos, stop=[stop, "\x00"])
    assert result.choices[0].message.content == expected
    assert result.choices[0].finish_reason == "stop"
    chunks = list(chat(client, max_tokens=16, temperature=0, logit_bias=no_eos, stop=stop,
                       stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducible_alone_and_in_a_busy_batch(
    client: openai.OpenAI, no_eos: dict[str, int]
) -> None:
    def seeded(seed: int) -> str:
        return chat(client, max_tokens=8, temperature=1.0, top_p=0.95, seed=seed,
                    logit_bias=no_eos).choices[0].message.content

    alone = seeded(1234)
    assert seeded(1234) == alone
    assert seeded(4321) != alone
    # The same seed while other sampled requests share the batch.
    others = [threading.Thread(target=chat, args=(client,),
                               kwargs=dict(max_tokens=24, temperature=1.0, logit_bias=no_eos))
              for _ in range(3)]
    for thread in others:
        thread.start()
    busy = seeded(1234)
    for thread in others:
        thread.join()
    assert busy == alone


def test_logit_bias_forces_a_token(client: openai.OpenAI) -> None:
    forced = 100
    result = client.completions.create(model=MODEL, prompt="Once", max_tokens=5, temperature=0,
                                       logprobs=0, logit_bias={str(forced): 100})
    tokens = result.choices[0].logprobs.tokens
    assert len(tokens) == 5 and len(set(tokens)) == 1
    # With the bias gone, greedy output differs.
    plain = client.completions.create(model=MODEL, prompt="Once", max_tokens=5, temperature=0,
                                      logprobs=0)
    assert plain.choices[0].logprobs.tokens != tokens


def test_frequency_penalty_reduces_repeats(client: openai.OpenAI, no_eos: dict[str, int]) -> None:
    def distinct_tokens(**kwargs) -> int:
        result = client.completions.create(model=MODEL, prompt="Once", max_tokens=24,
                                           temperature=0, logprobs=0, logit_bias=no_eos,
                                           **kwargs)
        return len(set(result.choices[0].logprobs.tokens))

    assert distinct_tokens(frequency_penalty=2.0, presence_penalty=2.0) > distinct_tokens()


def test_max_completion_tokens_wins(client: openai.OpenAI, no_eos: dict[str, int]) -> None:
    result = chat(client, max_tokens=9, max_completion_tokens=3, temperature=0,
                  logit_bias=no_eos)
    assert result.usage.completion_tokens == 3


def test_metrics_count_requests_and_tokens(server: ServerProcess, client: openai.OpenAI,
                                           no_eos: dict[str, int]) -> None:
    before = server.metrics()
    chat(client, max_tokens=4, temperature=0, logit_bias=no_eos)
    after = server.metrics()
    key = 'swan_requests_total{route="/v1/chat/completions",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["swan_generation_tokens_total"] >= before["swan_generation_tokens_total"] + 4
    assert after["swan_time_to_first_token_seconds_count"] > before[
        "swan_time_to_first_token_seconds_count"]
    assert after["swan_active_sequences"] == 0
    assert after["swan_queue_depth"] == 0
    status, body = http_get(server.base_url + "/metrics")
    assert b"# TYPE swan_time_per_output_token_seconds histogram" in body
    assert b"swan_prefix_cache_hits_total" in body

"""The serving pieces that need no server: stop strings, incremental decoding against a real
tokenizer, request validation messages, Prometheus text, per-sequence seeded sampling."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import pytest
from tokenizers import Tokenizer

from swan_serve.server.api.errors import APIError
from swan_serve.server.api.openai_chat import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
)
from swan_serve.server.api.wire import TextChunks as _TextChunks
from swan_serve.server.api.wire import parse_request
from swan_serve.server.chat.textstream import IncrementalDecoder, SequenceText, StopMatcher
from swan_serve.server.engine.generation import SamplingParams
from swan_serve.server.engine.sampling import make_sampler
from swan_serve.server.metrics import ServerMetrics


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = ""
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out += text
        if stopped:
            return out, True
    return out + matcher.flush(), False


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["Hello", " wor", "ld", "!"], ("world",), ("Hello ", True)),
        (["ab", "c"], ("bc", "abx"), ("a", True)),  # the earliest match wins
        (["wo", "rm"], ("world",), ("worm", False)),  # held back, then released
        (["END"], ("END",), ("", True)),
        (["a", "b"], (), ("ab", False)),
    ],
)
def test_stop_matcher(pieces: list[str], stops: tuple[str, ...],
                      expected: tuple[str, bool]) -> None:
    assert feed_all(StopMatcher(stops), pieces) == expected


def test_stop_matcher_holds_back_only_possible_prefixes() -> None:
    matcher = StopMatcher(("</answer>",))
    assert matcher.feed("x </ans") == ("x ", False)
    assert matcher.feed("wer> tail") == ("", True)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_checkpoint("qwen3", tokenizer="small") /
                                   "tokenizer.json"))


def test_incremental_decoding_equals_a_full_decode(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("User asked:").ids
    generated = tokenizer.encode(" héllo wörld, naïve café 🙂 end").ids
    decoder = IncrementalDecoder(tokenizer, prompt[-4:])
    pieces = [decoder.add(t) for t in generated]
    text = "".join(pieces) + decoder.flush()
    assert text == tokenizer.decode(generated, skip_special_tokens=False)
    assert text.startswith(" h")  # the leading space of the first token survives
    assert not any("\ufffd" in p for p in pieces)  # incomplete characters are held back


def test_sequence_text_stops_across_tokens(tokenizer: Tokenizer) -> None:
    generated = tokenizer.encode("one two three four").ids
    sequence = SequenceText(IncrementalDecoder(tokenizer, []), ("three",))
    out = ""
    for token in generated:
        text, stopped = sequence.add(token)
        out += text
        if stopped:
            break
    assert stopped and out == "one two "


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [1]}', "stop"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 1.5}', "seed"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
         b'"stream_options": {"include_usage": 1}}', "stream_options.include_usage"),
    ],
)
def test_validation_errors_name_the_parameter(body: bytes, param: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_request(ChatCompletionRequest, body)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert param in caught.value.message


def test_prometheus_text() -> None:
    metrics = ServerMetrics(queue_depth=lambda: 3, active_sequences=lambda: 2)
    metrics.count_request("/v1/chat/completions", 200)
    metrics.first_token(0.02)
    metrics.first_token(7.0)
    metrics.sequence_finished("stop", total_seconds=1.0, decode_seconds=0.9, tokens=10)
    text = metrics.render()
    assert 'swan_requests_total{route="/v1/chat/completions",status="200"} 1' in text
    assert "swan_queue_depth 3\n" in text and "swan_active_sequences 2\n" in text
    buckets = re.findall(r'swan_time_to_first_token_seconds_bucket\{le="([^"]+)"\} (\d+)', text)
    counts = [int(c) for _, c in buckets]
    assert counts == sorted(counts) and counts[-1] == 2 and buckets[-1][0] == "+Inf"
    assert dict(buckets)["0.025"] == "1"
    assert "swan_time_per_output_token_seconds_sum 0.1\n" in text
    for line in text.splitlines():  # every sample line is `name{labels} value`
        assert line.startswith("#") or re.match(r"^[a-z_]+(\{[^}]*\})? [-+0-9.eInf]+$", line)


def test_seeded_sampler_is_private_and_reproducible() -> None:
    params = SamplingParams(temperature=1.0, seed=42)
    logprobs = mx.log(mx.softmax(mx.random.normal((1, 64)), axis=-1))

    def draw(sampler) -> list[int]:
        return [sampler(logprobs).item() for _ in range(20)]

    first = draw(make_sampler(params, choice_index=0, vocab_size=64))
    mx.random.seed(7)  # the global random state does not matter
    assert draw(make_sampler(params, choice_index=0, vocab_size=64)) == first
    assert draw(make_sampler(params, choice_index=1, vocab_size=64)) != first
    greedy = make_sampler(SamplingParams(temperature=0.0), 0, 64)
    assert greedy is make_sampler(SamplingParams(temperature=0.0), 1, 64)


def test_fast_text_chunks_match_the_response_models() -> None:
    def render(index: int, text: str) -> str:
        choice = ChatChunkChoice(index=index, delta=ChatDelta(content=text), logprobs=None,
                                 finish_reason=None)
        chunk = ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", choices=[choice])
        chunk.usage = None
        return json.dumps(chunk.wire(), separators=(",", ":"), ensure_ascii=False)

    fast = _TextChunks(render)
    for index, text in [(0, "plain"), (1, 'quote " back\\slash\nnewline'), (0, "é🙂\x00"),
                        (2, "")]:
        assert fast(index, text) == render(index, text)
        assert json.loads(fast(index, text))["choices"][0]["delta"]["content"] == text

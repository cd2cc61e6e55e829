"""Anthropic Messages (/v1/messages) against the real server, driven by the official
`anthropic` SDK: text, streaming, a tool round trip with the trained tool-calling model,
thinking, stop sequences, count_tokens, x-api-key, errors in Anthropic's shape."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import pytest
from server_process import ServerProcess
from tool_model import (
    ANSWER,
    CALL_ARGUMENTS,
    QUESTION,
    REASONING,
    TOOL_RESULT,
    WEATHER_TOOL,
    cached_tool_model,
)

KEY = "sk-test-key"
WEATHER = {"name": "get_weather", "strict": True,
           "input_schema": WEATHER_TOOL["function"]["parameters"]}


@pytest.fixture(scope="module")
def client() -> Iterator[anthropic.Anthropic]:
    model = cached_tool_model("hermes")
    with ServerProcess(model.path, "--served-model-name", "tool-model",
                       "--api-key", KEY) as server:
        # The SDK sends the key as x-api-key.
        yield anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0,
                                  timeout=120)


def _ask(client: anthropic.Anthropic, messages: list[dict], **kwargs: object):
    kwargs = {"max_tokens": 120, "extra_body": {"temperature": 0}, **kwargs}
    return client.messages.create(model="tool-model", messages=messages, tools=[WEATHER],
                                  **kwargs)


def test_tool_round_trip(client: anthropic.Anthropic) -> None:
    first = _ask(client, [{"role": "user", "content": QUESTION}])
    assert first.stop_reason == "tool_use"
    kinds = [b.type for b in first.content]
    assert kinds == ["thinking", "tool_use"]
    assert first.content[0].thinking == REASONING
    call = first.content[1]
    assert call.name == "get_weather" and call.input == CALL_ARGUMENTS
    assert call.id.startswith("toolu_")
    assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    # The history goes back as Anthropic blocks: the tool_use, then a tool_result (the
    # model was trained on a history without the thinking, as the template renders it).
    second = _ask(client, [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": [call.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": TOOL_RESULT}]},
    ])
    assert second.stop_reason == "end_turn"
    assert [b.type for b in second.content] == ["text"]
    assert second.content[0].text == ANSWER


def test_streamed_tool_call_accumulates_to_the_same_message(client: anthropic.Anthropic) -> None:
    whole = _ask(client, [{"role": "user", "content": QUESTION}])
    with client.messages.stream(model="tool-model", max_tokens=120, tools=[WEATHER],
                                extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_start" in events and "content_block_stop" in events
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["thinking", "tool_use"]
    assert final.content[0].thinking == whole.content[0].thinking
    assert final.content[1].input == whole.content[1].input
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_raw_event_sequence(client: anthropic.Anthropic) -> None:
    stream = client.messages.create(model="tool-model", max_tokens=120, tools=[WEATHER],
                                    extra_body={"temperature": 0}, stream=True,
                                    messages=[{"role": "user", "content": QUESTION}])
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert set(deltas) == {"thinking_delta", "input_json_delta"}
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert json.loads(partial) == CALL_ARGUMENTS
    starts = [e.index for e in events if e.type == "content_block_start"]
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert starts == stops == [0, 1]


def test_text_stop_sequence_and_max_tokens(client: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    # Thinking off: the template closes the reasoning block in the prompt.
    plain = client.messages.create(model="tool-model", max_tokens=5, messages=messages,
                                   extra_body={"temperature": 0}, thinking={"type": "disabled"},
                                   system="You are terse.")
    assert plain.stop_reason == "max_tokens" and plain.usage.output_tokens == 5
    assert all(b.type == "text" for b in plain.content)
    stopped = _ask(client, messages, stop_sequences=["wants"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "wants"
    assert stopped.content[0].thinking.strip() == "The user"


def test_count_tokens_matches_usage(client: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    counted = client.messages.count_tokens(model="tool-model", messages=messages,
                                           tools=[WEATHER])
    used = _ask(client, messages).usage
    assert counted.input_tokens == used.input_tokens + (used.cache_read_input_tokens or 0)


def test_forced_tool_and_none(client: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "Hello there."}]
    forced = _ask(client, messages, tool_choice={"type": "tool", "name": "get_weather"})
    assert forced.stop_reason == "tool_use"
    [call] = [b for b in forced.content if b.type == "tool_use"]
    assert set(call.input) == {"city", "days"}
    none = _ask(client, [{"role": "user", "content": QUESTION}], tool_choice={"type": "none"})
    assert not [b for b in none.content if b.type == "tool_use"]
    assert none.stop_reason in ("end_turn", "max_tokens")


def test_errors_in_anthropic_shape(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="nope", max_tokens=5,
                               messages=[{"role": "user", "content": "x"}])
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="tool-model", max_tokens=0,
                               messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in info.value.body["error"]["message"]
    wrong = anthropic.Anthropic(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        wrong.messages.create(model="tool-model", max_tokens=5,
                              messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "authentication_error"
    bearer = anthropic.Anthropic(base_url=str(client.base_url), auth_token=KEY, max_retries=0)
    reply = bearer.messages.create(model="tool-model", max_tokens=2,
                                   messages=[{"role": "user", "content": "x"}])
    assert reply.usage.output_tokens <= 2


def test_max_tokens_past_the_context_is_a_cap(client: anthropic.Anthropic) -> None:
    # Claude Code asks for 32,000 tokens whatever the model's context holds.
    reply = _ask(client, [{"role": "user", "content": QUESTION}], max_tokens=10**6)
    assert reply.stop_reason == "tool_use"

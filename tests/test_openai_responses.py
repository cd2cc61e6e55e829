"""OpenAI Responses (/v1/responses) against the real server, driven by the openai SDK's
responses client: a tool round trip with the trained tool-calling model (reasoning and
function_call items), streaming accumulated by the SDK, previous_response_id and the
bounded store, text.format json_schema, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
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

WEATHER = {"type": "function", **WEATHER_TOOL["function"]}


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    model = cached_tool_model("hermes")
    with ServerProcess(model.path, "--served-model-name", "tool-model",
                       "--response-store-size", "3") as server:
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                            timeout=120)


def _ask(client: openai.OpenAI, input: object, **kwargs: object):
    kwargs = {"temperature": 0, "max_output_tokens": 120, **kwargs}
    return client.responses.create(model="tool-model", input=input, tools=[WEATHER], **kwargs)


def test_tool_round_trip_with_items(client: openai.OpenAI) -> None:
    first = _ask(client, QUESTION)
    assert first.status == "completed"
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    assert first.output[0].content[0].text == REASONING
    call = first.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == CALL_ARGUMENTS
    assert first.usage.output_tokens_details.reasoning_tokens > 0
    # The client sends the history back as items (the call and its output).
    second = _ask(client, [
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT},
    ])
    assert second.output_text == ANSWER
    assert [item.type for item in second.output] == ["message"]


def test_previous_response_id_continues_and_store_is_bounded(client: openai.OpenAI) -> None:
    first = _ask(client, QUESTION)
    call = first.output[1]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT}
    second = _ask(client, [result], previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # The same as sending the whole history as items (the reasoning item included, which
    # the template renders: the trained model never saw that, so its answer differs).
    explicit = _ask(client, [{"role": "user", "content": QUESTION},
                             *[item.model_dump() for item in first.output], result])
    assert second.output_text == explicit.output_text
    # The continued conversation reused the first turn's cached prompt.
    assert second.usage.input_tokens_details.cached_tokens > first.usage.input_tokens // 2
    assert client.responses.retrieve(second.id).output_text == second.output_text
    for _ in range(3):  # the store keeps 3: the first response is evicted
        _ask(client, "Hi.", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(first.id)
    assert "evicted" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError) as info:
        _ask(client, "Go on.", previous_response_id="resp_unknown")
    assert info.value.body["param"] == "previous_response_id"
    unstored = _ask(client, "Hi.", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_stream_accumulates_to_the_same_response(client: openai.OpenAI) -> None:
    whole = _ask(client, QUESTION)
    with client.responses.stream(model="tool-model", input=QUESTION, tools=[WEATHER],
                                 temperature=0, max_output_tokens=120) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.reasoning_text.delta" in kinds
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    assert [i.type for i in final.output] == [i.type for i in whole.output]
    assert final.output[1].arguments == whole.output[1].arguments
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert client.responses.retrieve(final.id).output[1].name == "get_weather"


def test_text_answer_and_incomplete(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="tool-model", input=QUESTION, temperature=0,
                                          max_output_tokens=3, stream=True,
                                          reasoning={"effort": "none"},
                                          instructions="Be brief."))
    kinds = [e.type for e in events]
    assert "response.output_text.delta" in kinds and "response.content_part.added" in kinds
    assert kinds[-1] == "response.incomplete"
    final = events[-1].response
    assert final.status == "incomplete"
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.usage.output_tokens == 3
    assert final.output_text == "".join(e.delta for e in events
                                        if e.type == "response.output_text.delta")


def test_json_schema_text_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}
    response = client.responses.create(
        model="tool-model", input="Answer in JSON.", max_output_tokens=60,
        reasoning={"effort": "none"},
        text={"format": {"type": "json_schema", "name": "r", "schema": schema}})
    assert set(json.loads(response.output_text)) == {"ok"}


def test_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="tool-model", input=[{"type": "image_generation_call"}])
    assert info.value.body["param"] == "input[0].type"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="other", input="x")

"""Constrained answers end to end: a tiny model with random weights behind the real server.

Whatever such a model would say, tool_choice "required" / a named function and a
json_schema response_format make its answers valid: the constraint, not the model, does it.
The schemas bound every string, number and array, so the answers always end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from parser_helpers import BOUNDED_TOOLS
from server_process import ServerProcess

from swan_serve.quant.fixtures import write_checkpoint


@pytest.fixture(scope="module")
def random_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    path = write_checkpoint(tmp_path_factory.mktemp("random") / "model", "qwen3",
                            tokenizer="small", seed=7)
    with ServerProcess(path, "--served-model-name", "random") as server:
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                            timeout=120)


@pytest.mark.parametrize("tool_choice", ["required",
                                         {"type": "function", "function": {"name": "pick"}}])
def test_random_model_forced_call_is_valid(random_client: openai.OpenAI,
                                           tool_choice: object) -> None:
    for stream in (False, True):
        kwargs = dict(model="random", messages=[{"role": "user", "content": "Wake me up."}],
                      tools=BOUNDED_TOOLS, tool_choice=tool_choice, parallel_tool_calls=False,
                      max_tokens=200, temperature=1.0, seed=3)
        if stream:
            with random_client.chat.completions.stream(**kwargs) as events:
                choice = events.get_final_completion().choices[0]
        else:
            choice = random_client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        arguments = json.loads(call.function.arguments)
        if isinstance(tool_choice, dict) or call.function.name == "pick":
            assert call.function.name == "pick" and arguments["color"] in ("red", "green")
        else:
            assert call.function.name == "set_alarm"
            assert 0 <= arguments["hour"] <= 23 and isinstance(arguments["loud"], bool)
            assert isinstance(arguments["label"], str) and len(arguments["label"]) <= 8


def test_random_model_json_schema_is_valid(random_client: openai.OpenAI) -> None:
    schema = {"type": "object",
              "properties": {"ok": {"type": "boolean"},
                             "n": {"type": "integer", "minimum": -5, "maximum": 5},
                             "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                      "maxItems": 3}},
              "required": ["ok", "n", "tags"], "additionalProperties": False}
    response = random_client.chat.completions.create(
        model="random", messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
        max_tokens=200, temperature=1.0, seed=5)
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    value = json.loads(choice.message.content)
    assert set(value) == {"ok", "n", "tags"} and isinstance(value["ok"], bool)
    assert -5 <= value["n"] <= 5 and all(t in ("a", "b") for t in value["tags"])


def test_bad_schema_is_a_400(random_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        random_client.chat.completions.create(
            model="random", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "r", "schema": {"type": "objekt"}}})
    assert info.value.body["param"] == "response_format"

"""Structured output that ends: what a schema leaves unbounded gets a default bound in the
grammar (the schema's own bounds win), so a weak model closes its JSON."""

from __future__ import annotations

import json

import openai
from server_process import ServerProcess

from swan_serve.quant.fixtures import write_checkpoint
from swan_serve.server.chat.schema_bounds import MAX_INTEGER, MAX_STRING, bounded


def test_defaults_fill_only_what_the_schema_leaves_open() -> None:
    schema = {"type": "object", "properties": {
        "n": {"type": "integer"}, "small": {"type": "integer", "maximum": 9},
        "x": {"type": ["number", "null"]}, "s": {"type": "string"},
        "code": {"type": "string", "maxLength": 100000}, "e": {"enum": ["a"]},
        "list": {"type": "array", "items": {"anyOf": [{"type": "string"}]}}},
        "$defs": {"d": {"type": "integer", "exclusiveMinimum": 0}}}
    out = bounded(schema)
    props = out["properties"]
    assert props["n"] == {"type": "integer", "maximum": MAX_INTEGER, "minimum": -MAX_INTEGER}
    assert props["small"] == {"type": "integer", "maximum": 9, "minimum": -MAX_INTEGER}
    assert props["x"]["multipleOf"] == 1e-6 and props["x"]["maximum"] == 1e15
    assert props["s"]["maxLength"] == MAX_STRING
    assert props["code"]["maxLength"] == 100000 and props["e"] == {"enum": ["a"]}
    assert props["list"]["items"]["anyOf"][0]["maxLength"] == MAX_STRING
    assert out["$defs"]["d"] == {"type": "integer", "exclusiveMinimum": 0,
                                 "maximum": MAX_INTEGER}
    assert schema["properties"]["n"] == {"type": "integer"}  # the client's copy is untouched


def test_weak_model_closes_unbounded_numbers(tmp_path) -> None:
    path = write_checkpoint(tmp_path / "model", "qwen3", tokenizer="small", seed=3)
    schema = {"type": "object", "properties": {"n": {"type": "integer"},
                                               "x": {"type": "number"}},
              "required": ["n", "x"], "additionalProperties": False}
    with ServerProcess(path, "--served-model-name", "m") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        for seed in range(5):
            choice = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Numbers."}], seed=seed,
                temperature=1.0, max_tokens=300,
                # Digits made likely, as a weak model that never stops writing them.
                logit_bias={str(t): 5.0 for t in range(24, 34)},
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "r", "schema": schema}}).choices[0]
            assert choice.finish_reason == "stop"
            value = json.loads(choice.message.content)
            assert abs(value["n"]) <= MAX_INTEGER and abs(value["x"]) <= 1e15

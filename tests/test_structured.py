"""response_format json_object / json_schema, enforced per sequence inside a batch."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from batch_helpers import Engine, generate, load_engine
from mlx_lm.sample_utils import make_sampler

from swan_serve.server.chat.chat_features import ChatFeatures, FeatureError
from swan_serve.server.chat.grammar import (
    ConstrainedDecoding,
    GrammarTokenizer,
    Phase,
    compile_grammar,
)
from swan_serve.server.chat.structured import response_format_grammar
from swan_serve.server.chat.tool_choice import BanTokens
from swan_serve.server.parsers.json_scan import JsonScanner

ALARM = {"type": "object",
         "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                        "label": {"type": "string", "maxLength": 6},
                        "days": {"type": "array", "items": {"enum": ["mon", "tue"]},
                                 "maxItems": 2}},
         "required": ["hour", "label", "days"], "additionalProperties": False}
CHOICE = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "grade": {"enum": ["A", "B", None]}},
          "required": ["ok", "grade"], "additionalProperties": False}
QUESTION = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Any) -> Engine:
    return load_engine(tiny_checkpoint("qwen3", tokenizer="small", seed=11))


@pytest.fixture(scope="module")
def feats(engine: Engine) -> ChatFeatures:
    return ChatFeatures.for_tokenizer(engine.tokenizer, engine.vocab_size)


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def ask(response_format: dict[str, Any] | None, tools: list | None = None) -> SimpleNamespace:
    return SimpleNamespace(tools=tools, tool_choice=None, parallel_tool_calls=None,
                           response_format=response_format)


def prompt(engine: Engine, **kwargs: Any) -> list[int]:
    return list(engine.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True,
                                                     **kwargs))


def content(feats: ChatFeatures, request: SimpleNamespace, tokens: list[int],
            ids: list[int]) -> str:
    parser = feats.parser_factory(feats.check_request(request), ids)()
    first, last = parser.feed(feats.tokenizer.decode(tokens)), parser.finish()
    return first.content + last.content


def test_json_schema_from_random_weights_in_a_mixed_batch(engine: Engine,
                                                          feats: ChatFeatures) -> None:
    ids = prompt(engine)  # the model may reason first; the answer after it is constrained
    requests = [ask(schema_format(ALARM)), ask(schema_format(ALARM)), ask(schema_format(CHOICE))]
    factories = [feats.processors(feats.check_request(r), ids, 160) for r in requests]
    mx.random.seed(3)
    samplers = [None, make_sampler(temp=1.0), None, None]
    results = generate(engine, [ids] * 4, [f() for f in factories] + [[]], 160, samplers)
    for request, (tokens, finish) in zip(requests, results[:3], strict=True):
        assert finish == "stop"
        value = json.loads(content(feats, request, tokens, ids))
        schema = request.response_format["json_schema"]["schema"]
        assert set(value) == set(schema["required"])
        if schema is ALARM:
            assert 0 <= value["hour"] <= 23 and len(value["label"]) <= 6
            assert len(value["days"]) <= 2 and set(value["days"]) <= {"mon", "tue"}
        else:
            assert isinstance(value["ok"], bool) and value["grade"] in ("A", "B", None)
    assert results[3] == generate(engine, [ids], [[]], 160)[0]  # the neighbour was left alone


def test_json_object_is_json_or_a_valid_prefix(engine: Engine, feats: ChatFeatures) -> None:
    ids = prompt(engine, enable_thinking=False)
    request = ask({"type": "json_object"})
    make = feats.processors(feats.check_request(request), ids, 48)
    [(tokens, finish)] = generate(engine, [ids], [make()], 48)
    text = content(feats, request, tokens, ids)
    scanner = JsonScanner()
    assert scanner.feed(text) == len(text) and not scanner.error
    assert text.startswith("{")
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length"  # an unbounded object may not end in 48 tokens


def test_json_answer_or_a_tool_call(engine: Engine, feats: ChatFeatures) -> None:
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"color": {"enum": ["red", "green"]}},
        "required": ["color"], "additionalProperties": False}}}]
    ids = list(engine.tokenizer.apply_chat_template(QUESTION, tools=tools,
                                                    add_generation_prompt=True,
                                                    enable_thinking=False))
    outputs = set()
    for seed in range(4):
        request = ask(schema_format(CHOICE), tools)
        make = feats.processors(feats.check_request(request), ids, 80)
        mx.random.seed(seed)
        [(tokens, finish)] = generate(engine, [ids], [make()], 80, [make_sampler(temp=1.0)])
        parser = feats.parser_factory(feats.check_request(request), ids)()
        first, last = parser.feed(engine.tokenizer.decode(tokens)), parser.finish()
        assert finish == "stop"
        if first.tool_calls or last.tool_calls:
            assert first.content + last.content == ""
            outputs.add("call")
        else:
            assert set(json.loads(first.content + last.content)) == {"ok", "grade"}
            outputs.add("json")
    assert outputs  # each answer was one or the other


@pytest.mark.parametrize("response_format, param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
     "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(unclosed"}}}, "response_format"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, "response_format.json_schema.schema"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_unusable_formats_are_refused(engine: Engine, feats: ChatFeatures,
                                      response_format: dict, param: str) -> None:
    with pytest.raises(FeatureError) as info:
        request = ask(response_format)
        feats.processors(feats.check_request(request), prompt(engine), 16)
    assert info.value.param == param


def test_text_format_constrains_nothing_but_a_call(engine: Engine, feats: ChatFeatures) -> None:
    # No grammar; with no tools declared only the call's opening token is banned.
    request = ask({"type": "text"})
    make = feats.processors(feats.check_request(request), prompt(engine), 16)
    [ban] = make()
    assert isinstance(ban, BanTokens)
    opening = engine.tokenizer.convert_tokens_to_ids("<tool_call>")
    assert ban(mx.array([1]), mx.zeros((1, 1024)))[0, opening].item() == -float("inf")


def test_padded_vocabulary_columns_are_never_allowed(feats: ChatFeatures) -> None:
    grammar = compile_grammar(feats.grammar, response_format_grammar({"type": "boolean"}))
    processor = ConstrainedDecoding(grammar, Phase.GRAMMAR)
    width = feats.grammar.vocab_size + 64  # models pad their embedding past the tokenizer
    logits = mx.zeros((1, width))
    out = processor(mx.array([1, 2, 3]), logits)
    assert out.shape == (1, width)
    allowed = np.isfinite(np.array(out[0]))
    assert allowed.any() and not allowed[feats.grammar.vocab_size:].any()


def test_mask_time_on_the_real_qwen3_vocabulary(shared_models_dir: Path) -> None:
    """Figures for the README: llguidance with the 151k-token Qwen3 tokenizer."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(shared_models_dir / "Qwen3-8B")
    grammar_tokenizer = GrammarTokenizer(tokenizer, 151936, sorted(tokenizer.eos_token_ids))
    start = time.perf_counter()
    _ = grammar_tokenizer.ll
    build = time.perf_counter() - start
    grammar = compile_grammar(grammar_tokenizer, response_format_grammar(ALARM))
    processor = ConstrainedDecoding(grammar, Phase.GRAMMAR)
    text = '{"hour": 7, "label": "wake", "days": ["mon", "tue"]}'
    answer = list(tokenizer.encode(text, add_special_tokens=False)) + [151645]
    context = [1, 2, 3]
    logits = mx.zeros((1, 151936))
    times = []
    for token in answer:
        begin = time.perf_counter()
        out = processor(mx.array(context), logits)
        mx.eval(out)
        times.append(time.perf_counter() - begin)
        assert np.isfinite(np.array(out[0, token])).item(), tokenizer.decode([token])
        context.append(token)
    median = float(np.median(times[1:]))
    print(f"\nllguidance, Qwen3 vocab: tokenizer {build:.2f} s, mask+apply median "
          f"{median * 1e3:.2f} ms/token, max {max(times) * 1e3:.1f} ms")
    assert median < 0.05

"""tool_choice and parallel_tool_calls, enforced while decoding.

A tiny model with random weights runs in an mlx_lm BatchGenerator batch, as in the server:
whatever it would say, the constraint makes the answer a valid call of an allowed function
with arguments that satisfy the tool's schema (bounded here, so the answer always ends).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import pytest
from batch_helpers import Engine, ForceTokens, generate, load_engine
from mlx_lm.sample_utils import make_sampler
from parser_helpers import BOUNDED_TOOLS as TOOLS
from tool_model import XML_TEMPLATE

from swan_serve.quant.fixtures.tokenizer import CHAT_TEMPLATE
from swan_serve.server.chat.chat_features import ChatFeatures, FeatureError
from swan_serve.server.chat.tool_choice import MAX_PARALLEL_CALLS, forced_calls_grammar
from swan_serve.server.parsers import assemble_calls

QUESTION = [{"role": "user", "content": "Wake me at seven."}]
FORMATS = ("hermes", "qwen3_xml", "mistral")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Any) -> Engine:
    return load_engine(tiny_checkpoint("qwen3", tokenizer="small", seed=11))


def features(engine: Engine, fmt: str = "auto") -> ChatFeatures:
    return ChatFeatures.for_tokenizer(engine.tokenizer, engine.vocab_size, fmt)


def ask(**fields: Any) -> SimpleNamespace:
    """The tool fields of a chat request."""
    return SimpleNamespace(**{"tools": TOOLS, "tool_choice": None, "parallel_tool_calls": None,
                              "response_format": None, **fields})


def prompt(engine: Engine, template: str | None = None, **kwargs: Any) -> list[int]:
    return list(engine.tokenizer.apply_chat_template(
        QUESTION, tools=TOOLS, add_generation_prompt=True, chat_template=template, **kwargs))


def answer(feats: ChatFeatures, request: SimpleNamespace, tokens: list[int],
           prompt_ids: list[int]) -> tuple[str, list[tuple[str, dict]]]:
    """(content, [(name, arguments)]) as the server would return them."""
    parser = feats.parser_factory(feats.check_request(request), prompt_ids)()
    text = feats.tokenizer.decode(tokens)
    first, last = parser.feed(text), parser.finish()
    calls = assemble_calls(first.tool_calls + last.tool_calls)
    return first.content + last.content, [(c["function"]["name"],
                                           json.loads(c["function"]["arguments"]))
                                          for c in calls]


def assert_valid(name: str, arguments: dict[str, Any]) -> None:
    if name == "pick":
        assert arguments == {"color": arguments["color"]} and arguments["color"] in ("red",
                                                                                    "green")
        return
    assert name == "set_alarm" and set(arguments) == {"hour", "label", "loud"}
    assert isinstance(arguments["hour"], int) and 0 <= arguments["hour"] <= 23
    assert isinstance(arguments["label"], str) and len(arguments["label"]) <= 8
    assert isinstance(arguments["loud"], bool)


@pytest.mark.parametrize("fmt", FORMATS)
def test_required_and_named_calls_are_valid_from_random_weights(engine: Engine,
                                                                fmt: str) -> None:
    feats = features(engine, fmt)
    requests = [ask(tool_choice="required", parallel_tool_calls=False),
                ask(tool_choice={"type": "function", "function": {"name": "pick"}}),
                ask(tool_choice="required", parallel_tool_calls=False)]
    ids = prompt(engine)
    factories = [feats.processors(feats.check_request(r), ids, 160) for r in requests]
    # Greedy, greedy, sampled; and an unconstrained neighbour in the same batch.
    mx.random.seed(5)
    samplers = [None, None, make_sampler(temp=1.0), None]
    results = generate(engine, [ids] * 4, [f() for f in factories] + [[]], 160, samplers)
    for request, (tokens, finish) in zip(requests, results[:3], strict=True):
        content, calls = answer(feats, request, tokens, ids)
        assert finish == "stop" and content == "" and len(calls) == 1, (fmt, content, calls)
        assert_valid(*calls[0])
    assert answer(feats, requests[1], results[1][0], ids)[1][0][0] == "pick"
    alone = generate(engine, [ids], [[]], 160)[0]
    assert results[3] == alone  # the constraints did not leak into another sequence


def test_parallel_calls_when_allowed(engine: Engine) -> None:
    feats = features(engine)
    request = ask(tool_choice="required")
    ids = prompt(engine, enable_thinking=False)
    make = feats.processors(feats.check_request(request), ids, 500)
    mx.random.seed(1)
    [(tokens, finish)] = generate(engine, [ids], [make()], 500, [make_sampler(temp=1.0)])
    content, calls = answer(feats, request, tokens, ids)
    assert finish == "stop" and content == ""
    assert 0 < len(calls) <= MAX_PARALLEL_CALLS
    for call in calls:
        assert_valid(*call)


@pytest.mark.parametrize("parallel", [True, False])
def test_a_second_call_only_when_parallel_calls_are_allowed(engine: Engine,
                                                            parallel: bool) -> None:
    feats = features(engine)
    ids = prompt(engine, enable_thinking=False)
    one = '<tool_call>\n{"name": "pick", "arguments": {"color": "red"}}\n</tool_call>'
    two = f"{one}\n{one.replace('red', 'green')}"
    script = _tokens(engine, two)
    request = ask(tool_choice="required", parallel_tool_calls=parallel)
    make = feats.processors(feats.check_request(request), ids, len(script) + 4)
    [(tokens, finish)] = generate(engine, [ids], [[ForceTokens(script), *make()]],
                                  len(script) + 4)
    assert finish == "stop"
    assert tokens == (script if parallel else _tokens(engine, one))


def test_reasoning_opened_by_the_template_comes_first(engine: Engine) -> None:
    feats = features(engine, "qwen3_xml")
    request = ask(tool_choice="required", parallel_tool_calls=False)
    ids = prompt(engine, XML_TEMPLATE)
    assert feats.reasoning_start(ids) == "open"
    budget = 100  # half of max_tokens may be reasoning
    make = feats.processors(feats.check_request(request), ids, 2 * budget)
    [(tokens, finish)] = generate(engine, [ids], [make()], 2 * budget)
    end = feats.think_tokens.end
    assert end in tokens and tokens.index(end) <= budget
    _, calls = answer(feats, request, tokens, ids)
    assert finish == "stop" and len(calls) == 1
    assert_valid(*calls[0])


def test_tool_choice_none_bans_the_call_opening(engine: Engine) -> None:
    feats = features(engine)
    ids = prompt(engine)
    opening = engine.tokenizer.convert_tokens_to_ids("<tool_call>")
    eager = ForceTokens([opening] * 3)  # a model that wants to call a tool right away
    [(free, _)] = generate(engine, [ids], [[eager]], 3)
    assert free[0] == opening
    make = feats.processors(feats.check_request(ask(tool_choice="none")), ids, 3)
    [(banned, _)] = generate(engine, [ids], [[ForceTokens([opening] * 3), *make()]], 3)
    assert opening not in banned


def _tokens(engine: Engine, text: str) -> list[int]:
    return list(engine.tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("script, stops_after", [
    ('<tool_call>\n{"name": "pick", "arguments": {"color": "red"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "pick", "arguments": {"color": "green"}}\n</tool_call>', 1),
    # A closing tag inside the reasoning block does not count.
    ("<think>\nmaybe </tool_call>\n</think>\n\n"
     '<tool_call>\n{"name": "pick", "arguments": {"color": "red"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "pick", "arguments": {"color": "green"}}\n</tool_call>', 2),
])
def test_parallel_tool_calls_false_stops_after_the_first_call(engine: Engine, script: str,
                                                              stops_after: int) -> None:
    feats = features(engine)
    ids = prompt(engine)
    script_ids = _tokens(engine, script)
    request = ask(tool_choice="auto", parallel_tool_calls=False)
    make = feats.processors(feats.check_request(request), ids, len(script_ids))
    [(free, _)] = generate(engine, [ids], [[ForceTokens(script_ids)]], len(script_ids))
    assert free == script_ids
    [(tokens, finish)] = generate(engine, [ids], [[ForceTokens(script_ids), *make()]],
                                  len(script_ids))
    closing = engine.tokenizer.convert_tokens_to_ids("</tool_call>")
    cut = [i for i, t in enumerate(script_ids) if t == closing][stops_after - 1] + 1
    assert finish == "stop" and tokens == script_ids[:cut]


@pytest.mark.parametrize("fields, param", [
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "always"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters"),
])
def test_bad_requests_name_the_parameter(engine: Engine, fields: dict, param: str) -> None:
    with pytest.raises(FeatureError) as info:
        features(engine).check_request(ask(**fields))
    assert info.value.param == param


def test_forcing_needs_a_known_format(engine: Engine) -> None:
    with pytest.raises(FeatureError, match="--tool-call-parser"):
        features(engine, "none").check_request(ask(tool_choice="required"))


def _accepts(feats: ChatFeatures, fmt: str, text: str) -> bool:
    from swan_serve.server.chat.grammar import compile_grammar
    from swan_serve.server.chat.tool_choice import ToolChoice
    from swan_serve.server.parsers import format_named

    lark = forced_calls_grammar(format_named(fmt), TOOLS, ToolChoice("function", "set_alarm"),
                                False, feats.grammar.marker)
    matcher = compile_grammar(feats.grammar, lark).new_matcher()
    tokens = list(feats.tokenizer.encode(text, add_special_tokens=False))
    return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


def _rendered_call(engine: Engine, template: str) -> str:
    arguments = {"hour": 7, "label": "wake up", "loud": True}
    call = {"type": "function", "function": {"name": "set_alarm", "arguments": arguments}}
    messages = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [call]}]
    text = engine.tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False,
                                                chat_template=template)
    turn = text.rsplit("<|im_start|>assistant\n", 1)[1].split("<|im_end|>")[0]
    return turn.split("</think>")[-1]


@pytest.mark.parametrize("fmt, template", [("hermes", CHAT_TEMPLATE),
                                           ("qwen3_xml", XML_TEMPLATE)])
def test_the_grammar_accepts_what_the_template_writes(engine: Engine, fmt: str,
                                                      template: str) -> None:
    feats = features(engine, fmt)
    assert _accepts(feats, fmt, _rendered_call(engine, template))
    assert not _accepts(feats, fmt, '<tool_call>\n{"name": "set_alarm"}\n</tool_call>')


def test_the_grammar_accepts_what_qwen35_writes(engine: Engine, shared_models_dir: Path) -> None:
    template = (shared_models_dir / "Qwen3.5-397B-A17B" / "chat_template.jinja").read_text()
    feats = features(engine, "qwen3_xml")
    assert _accepts(feats, "qwen3_xml", _rendered_call(engine, template))

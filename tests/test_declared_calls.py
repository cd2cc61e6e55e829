"""Tool calls name only declared tools, with arguments valid for their schemas, in
tool_choice "auto" (and "none" makes no call), whatever the model: random weights behind the
real server, with the opening marker made likely so that calls happen, on every route.

Grammar-level checks against the real tokenizer and llguidance come first: the forms with a
special-token opening (Qwen) and with a several-token text opening (Mistral's
[TOOL_CALLS] in the small tokenizer), and "none" excluding a several-token opening.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import openai
import pytest
from mlx_lm.utils import load_tokenizer
from parser_helpers import BOUNDED_TOOLS
from server_process import ServerProcess
from tool_model import XML_TEMPLATE

from swan_serve.quant.fixtures import write_checkpoint
from swan_serve.server.chat.declared_calls import declared_calls_grammar, no_calls_grammar
from swan_serve.server.chat.grammar import GrammarTokenizer, compile_grammar
from swan_serve.server.parsers.registry import FORMATS

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED_TOOLS}
OPENING = 5  # <tool_call> in the fixtures' small tokenizer
REQUESTS_PER_FORMAT = 101
# Smaller than the factory's default: 200 sampled requests must stay quick.
TINY = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "intermediate_size": 128, "num_hidden_layers": 1}


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("declared") / "model", "qwen3",
                            tokenizer="small", seed=11, dtype="float32", overrides=TINY)


@pytest.fixture(scope="module")
def grammar_tokenizer(random_model: Path) -> GrammarTokenizer:
    tokenizer = load_tokenizer(random_model)
    return GrammarTokenizer(tokenizer, 1024, [tokenizer.eos_token_id])


def _accepts(tokenizer: GrammarTokenizer, lark: str, text: str) -> bool:
    matcher = compile_grammar(tokenizer, lark).new_matcher()
    ids = tokenizer._tokenizer.encode(text, add_special_tokens=False)
    return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()


@pytest.mark.parametrize("fmt, call, other", [
    ("hermes", '<tool_call>\n{"name": "pick", "arguments": {"color": "red"}}\n</tool_call>',
     '<tool_call>\n{"name": "lookup_docs", "arguments": {}}\n</tool_call>'),
    ("mistral", '[TOOL_CALLS]pick[ARGS]{"color": "red"}', '[TOOL_CALLS]lookup_docs[ARGS]{}'),
])
def test_grammar_lets_text_and_declared_calls_through(grammar_tokenizer: GrammarTokenizer,
                                                      fmt: str, call: str, other: str) -> None:
    for parallel in (True, False):
        lark = declared_calls_grammar(FORMATS[fmt], BOUNDED_TOOLS, parallel,
                                      grammar_tokenizer.marker)
        assert _accepts(grammar_tokenizer, lark, "Just text, [TOOL or <tool.")
        assert _accepts(grammar_tokenizer, lark, "Sure. " + call)
        assert not _accepts(grammar_tokenizer, lark, "Sure. " + other)
        bad_arguments = call.replace('"red"', '"blue"')
        assert not _accepts(grammar_tokenizer, lark, bad_arguments)
        assert _accepts(grammar_tokenizer, lark, call + "\n" + call) is parallel


def test_none_excludes_a_several_token_opening(grammar_tokenizer: GrammarTokenizer) -> None:
    lark = no_calls_grammar(FORMATS["mistral"])
    assert len(grammar_tokenizer._tokenizer.encode("[TOOL_CALLS]")) > 1
    assert _accepts(grammar_tokenizer, lark, "No call: [TOOL_CALL, TOOL_CALLS]")
    assert not _accepts(grammar_tokenizer, lark, "A call: [TOOL_CALLS]pick")


# ---------------------------------------------------------------- the real server


def _valid(value: object, schema: dict) -> bool:
    """Enough of JSON schema for BOUNDED_TOOLS: object, integer, string, boolean, enum."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and set(schema.get("required", [])) <= set(value)
                and set(value) <= set(props)
                and all(_valid(v, props[k]) for k, v in value.items()))
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", value) <= value <= schema.get("maximum", value))
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "boolean":
        return isinstance(value, bool)
    return False


@pytest.fixture(scope="module", params=["hermes", "xml"])
def server(request: pytest.FixtureRequest, random_model: Path, tmp_path_factory
           ) -> Iterator[ServerProcess]:
    path = random_model
    if request.param == "xml":  # the same weights behind an XML-call chat template
        path = tmp_path_factory.mktemp("xml") / "model"
        path.mkdir()
        for item in random_model.iterdir():
            (path / item.name).symlink_to(item)
        config = json.loads((random_model / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").unlink()
        (path / "tokenizer_config.json").write_text(json.dumps(
            {**config, "chat_template": XML_TEMPLATE}))
    with ServerProcess(path, "--served-model-name", "random", "--max-concurrency", "8") as s:
        s.style = request.param
        yield s


def test_auto_calls_name_declared_tools_with_valid_arguments(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                           timeout=120)

    max_tokens = 110 if server.style == "xml" else 80  # XML calls take more tokens

    def ask(seed: int) -> tuple[str, list]:
        choice = client.chat.completions.create(
            model="random", messages=[{"role": "user", "content": f"Request {seed}."}],
            tools=BOUNDED_TOOLS, temperature=1.0, seed=seed, max_tokens=max_tokens,
            # The XML template opens a reasoning block that random weights never close.
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
            parallel_tool_calls=seed % 8 == 0,  # parallel: lifted openings go on to max_tokens
            # Random weights rarely open a call; lift the opening token so that most do.
            logit_bias={str(OPENING): 6.0}).choices[0]
        return choice.finish_reason, choice.message.tool_calls or []

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(REQUESTS_PER_FORMAT)))
    # An answer cut by max_tokens may end inside a call (no valid JSON is promised then).
    ended = [made for reason, made in answers if reason != "length"]
    assert [reason for reason, made in answers if made and reason != "length"] == \
        ["tool_calls"] * len([made for made in ended if made])
    calls = [call for made in ended for call in made]
    assert len(calls) >= REQUESTS_PER_FORMAT // 2  # the test exercises calls, not just text
    for call in calls:
        assert call.function.name in SCHEMAS
        assert _valid(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_other_routes_and_none(server: ServerProcess) -> None:
    """The same enforcement behind /v1/messages and /v1/responses (one shared path); and
    tool_choice "none" makes no call even with the opening token lifted."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    none = client.chat.completions.create(
        model="random", messages=[{"role": "user", "content": "Hi."}], tools=BOUNDED_TOOLS,
        tool_choice="none", temperature=1.0, seed=1, max_tokens=20,
        logit_bias={str(OPENING): 50.0})
    assert not none.choices[0].message.tool_calls
    assert "<tool_call>" not in (none.choices[0].message.content or "")
    # No tools at all: nothing may be called, so no call text lands in the content either.
    bare = client.chat.completions.create(
        model="random", messages=[{"role": "user", "content": "Hi."}], temperature=1.0,
        seed=1, max_tokens=20, logit_bias={str(OPENING): 50.0})
    assert "<tool_call>" not in (bare.choices[0].message.content or "")
    messages = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]}
             for t in BOUNDED_TOOLS]
    for seed in range(4):
        reply = messages.messages.create(model="random", max_tokens=80, tools=tools,
                                         messages=[{"role": "user", "content": f"{seed}"}])
        for block in reply.content:
            if block.type == "tool_use" and reply.stop_reason != "max_tokens":
                assert _valid(block.input, SCHEMAS[block.name])
        response = client.responses.create(model="random", input=f"{seed}", tools=[
            {"type": "function", **t["function"]} for t in BOUNDED_TOOLS],
            max_output_tokens=80)
        for item in response.output:
            if item.type == "function_call" and response.status == "completed":
                assert _valid(json.loads(item.arguments), SCHEMAS[item.name])

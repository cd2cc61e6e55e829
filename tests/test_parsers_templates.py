"""Real chat templates: the format is recognised, and what a template renders for past
calls (from OpenAI-style request messages) parses back to the same calls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from parser_helpers import run, small_tokenizer

from swan_serve.quant.fixtures.tokenizer import CHAT_TEMPLATE
from swan_serve.server.chat.request import ChatMessage
from swan_serve.server.chat.tool_messages import MessageError, template_messages
from swan_serve.server.parsers import (
    CHOICES,
    ChoiceParser,
    ReasoningParser,
    detect_format,
    resolve_format,
)

TOOLS = [{"type": "function", "function": {"name": "plan_trip", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                   "hourly": {"type": "boolean"}, "options": {"type": "object"},
                   "note": {"type": "string"}}}}}]
ARGUMENTS = [
    {"city": "Zürich", "days": 3, "hourly": True, "options": {"a": [1, 2]},
     "note": "two\nlines with <b>tags</b>"},
    {"city": "東京", "days": 0, "hourly": False, "options": {}, "note": ""},
]


def _shared_template(models: Path, name: str) -> str:
    path = models / name
    if path.suffix == ".jinja":
        return path.read_text()
    return json.loads(path.read_text())["chat_template"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


def _history() -> list[dict[str, Any]]:
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": "plan_trip", "arguments": json.dumps(args)}}
             for i, args in enumerate(ARGUMENTS)]
    return [{"role": "user", "content": "Plan two trips."},
            {"role": "assistant", "content": None, "tool_calls": calls}]


def _assistant_turn(tokenizer: Any, template: str) -> str:
    rendered = tokenizer._tokenizer.apply_chat_template(
        template_messages(_history()), tools=TOOLS, chat_template=template, tokenize=False)
    turn = rendered.rsplit("<|im_start|>assistant", 1)[1]
    return turn.split("<|im_end|>", 1)[0]


def _round_trip(tokenizer: Any, template: str, expected_format: str) -> None:
    fmt = detect_format(template)
    assert fmt is not None and fmt.name == expected_format
    text = _assistant_turn(tokenizer, template)
    parsed = run(ChoiceParser(ReasoningParser(), fmt.parser(TOOLS)), list(text))
    assert parsed.content == ""
    assert [(name, json.loads(args)) for name, args in parsed.calls] == \
        [("plan_trip", args) for args in ARGUMENTS]


def test_fixture_template_round_trip(tokenizer: Any) -> None:
    _round_trip(tokenizer, CHAT_TEMPLATE, "hermes")


@pytest.mark.parametrize("name, expected", [
    ("Qwen3-8B/tokenizer_config.json", "hermes"),
    ("Qwen3-0.6B/tokenizer_config.json", "hermes"),
    ("Qwen3.5-397B-A17B/chat_template.jinja", "qwen3_xml"),
    ("Qwen3-Coder-30B-A3B-Instruct/chat_template.llama.cpp-vendored.jinja", "qwen3_xml"),
])
def test_real_template_round_trip(tokenizer: Any, shared_models_dir: Path, name: str,
                                  expected: str) -> None:
    _round_trip(tokenizer, _shared_template(shared_models_dir, name), expected)


def test_detection_without_a_template() -> None:
    assert detect_format("{{ '[TOOL_CALLS]' + tool_calls | tojson }}").name == "mistral"
    assert detect_format(None, {"<tool_call>": 5, "</tool_call>": 6}).name == "hermes"
    assert detect_format("{{ messages }}", {"a": 1}) is None
    assert detect_format({"default": "x", "tool_use": "<tool_call>"}).name == "hermes"


def test_override_names() -> None:
    assert resolve_format("none", CHAT_TEMPLATE) is None
    assert resolve_format("auto", CHAT_TEMPLATE).name == "hermes"
    assert resolve_format("qwen3_coder", CHAT_TEMPLATE).name == "qwen3_xml"
    with pytest.raises(ValueError, match="hermes") as info:
        resolve_format("glm", CHAT_TEMPLATE)
    assert all(choice in str(info.value) for choice in CHOICES)


# ---------------------------------------------------------------- request messages


def test_request_messages_become_template_messages() -> None:
    messages = [ChatMessage.model_validate(m) for m in [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Plan "},
                                     {"type": "text", "text": "a trip."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_7", "type": "function",
             "function": {"name": "plan_trip", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_8", "type": "function",
             "function": {"name": "noop", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "ok"},
    ]]
    out = template_messages(messages)
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[1] == {"role": "user", "content": "Plan a trip."}
    assert out[2]["content"] == ""
    assert [c["function"]["arguments"] for c in out[2]["tool_calls"]] == [{"city": "Oslo"}, {}]
    assert out[3] == {"role": "tool", "content": "ok", "tool_call_id": "call_7",
                      "name": "plan_trip"}


@pytest.mark.parametrize("message, param", [
    ({"role": "user", "content": None}, "messages[0].content"),
    ({"role": "assistant", "content": None}, "messages[0].content"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}, "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "[1]"}}]}, "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]},
     "messages[0].tool_calls[0].function"),
    ({"role": "user", "content": [{"type": "text", "text": "a"},
                                  {"type": "image_url", "image_url": {"url": "x"}}]},
     "messages[0].content[1].type"),
])
def test_bad_messages_name_the_parameter(message: dict[str, Any], param: str) -> None:
    with pytest.raises(MessageError) as info:
        template_messages([message])
    assert info.value.param == param
    unsupported = param.endswith(".type")
    assert info.value.code == ("unsupported_parameter" if unsupported else "invalid_value")

"""Qwen3 / Hermes JSON tool calls, on outputs written the way these models write them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from parser_helpers import run, same_everywhere, small_tokenizer

from swan_serve.server.parsers import ChoiceParser, ReasoningParser
from swan_serve.server.parsers.hermes_json import HermesJsonParser

WEATHER = '{"location": "Paris, France", "unit": "celsius"}'
# Recorded in Qwen3's style: reasoning block, blank line, call, no text after it.
QWEN3_CALL = (
    "<think>\nThe user asks about the weather in Paris. I should call get_weather.\n"
    "</think>\n\n<tool_call>\n"
    f'{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>'
)
QWEN3_PARALLEL = (
    "<think>\nTwo cities, two calls.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tokyo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}}\n</tool_call>'
)
TEXT_THEN_CALL = (
    "Let me look that up for you.\n\n<tool_call>\n"
    '{"name": "search", "arguments": {"query": "mlx \\"batching\\" {fast}", "k": 3}}\n'
    "</tool_call>"
)
UNICODE_CALL = (
    '<tool_call>\n{"name": "translate", "arguments": {"text": "Grüße aus Zürich 🌧️ 東京", '
    '"escaped": "caf\\u00e9 \\ud83d\\ude00", "target": "ja"}}\n</tool_call>'
)
NESTED_CALL = (
    '<tool_call>\n{"name": "create_event", "arguments": {"event": {"title": "}{ tricky ]",'
    ' "attendees": [{"name": "Ann", "tags": ["a", {"deep": [1, 2.5e-3, -0, true, null]}]}],'
    ' "meta": {}}, "notify": false}}\n</tool_call>'
)
RECORDED = [QWEN3_CALL, QWEN3_PARALLEL, TEXT_THEN_CALL, UNICODE_CALL, NESTED_CALL]


def choice_parser(tools: list[dict[str, Any]] | None = None) -> ChoiceParser:
    return ChoiceParser(ReasoningParser(), HermesJsonParser(tools))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("text", RECORDED, ids=["qwen3", "parallel", "text-first", "unicode",
                                                "nested"])
def test_every_cutting_gives_the_same_message(text: str, tokenizer: Any) -> None:
    parsed = same_everywhere(choice_parser, text, tokenizer)
    assert parsed.calls, "no call found"
    for _, arguments in parsed.calls:
        json.loads(arguments)
    assert "<tool_call>" not in parsed.content and "</tool_call>" not in parsed.content


def test_single_call_with_reasoning() -> None:
    parsed = run(choice_parser(), [QWEN3_CALL])
    assert parsed.content == ""
    assert parsed.reasoning == \
        "The user asks about the weather in Paris. I should call get_weather."
    assert parsed.calls == [("get_weather", WEATHER)]


def test_parallel_calls_get_increasing_indexes_and_distinct_ids() -> None:
    parsed = run(choice_parser(), list(QWEN3_PARALLEL))
    opening = [f for f in parsed.fragments if "id" in f]
    assert [f["index"] for f in opening] == [0, 1]
    assert len({f["id"] for f in opening}) == 2
    assert parsed.calls == [("get_weather", '{"location": "Tokyo"}'),
                            ("get_time", '{"tz": "Asia/Tokyo"}')]
    assert parsed.content == ""


def test_fragments_have_openais_shape() -> None:
    # Character by character: the name first, then the arguments in many small pieces.
    parsed = run(choice_parser(), list(QWEN3_CALL))
    first, *later = parsed.fragments
    assert first["type"] == "function" and first["id"].startswith("call_")
    assert set(first) == {"index", "id", "type", "function"}
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert len(later) > 5, "the arguments were not streamed"
    for fragment in later:
        assert set(fragment) == {"index", "function"} and set(fragment["function"]) == {
            "arguments"}
    assert "".join(f["function"]["arguments"] for f in later) == WEATHER


def test_text_before_a_call_is_content_without_trailing_space() -> None:
    parsed = run(choice_parser(), [TEXT_THEN_CALL])
    assert parsed.content == "Let me look that up for you."
    [(name, arguments)] = parsed.calls
    assert name == "search"
    assert json.loads(arguments) == {"query": 'mlx "batching" {fast}', "k": 3}


def test_unicode_and_escapes_are_kept_as_written() -> None:
    [(_, arguments)] = run(choice_parser(), [UNICODE_CALL]).calls
    assert '"caf\\u00e9 \\ud83d\\ude00"' in arguments  # the model's escapes, untouched
    assert json.loads(arguments)["text"] == "Grüße aus Zürich 🌧️ 東京"


def test_tags_cut_across_tokens() -> None:
    pieces = ["Sure.", "\n<", "tool", "_call", ">\n{\"na", "me\": \"f\", \"argu", "ments\": {",
              "\"x\": 1}}\n</", "tool_", "call>"]
    parsed = run(choice_parser(), pieces)
    assert parsed.message() == ("Sure.", "", [("f", '{"x": 1}')])


def test_malformed_call_is_returned_as_content_and_parsing_goes_on() -> None:
    bad = '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>'
    good = '<tool_call>\n{"name": "ok", "arguments": {}}\n</tool_call>'
    parsed = same_everywhere(choice_parser, f"{bad}\n{good}")
    assert parsed.content == bad
    assert parsed.calls == [("ok", "{}")]
    assert parsed.fragments[0]["index"] == 0


@pytest.mark.parametrize("text, expected", [
    # The closing tag left out at the end of the output.
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}', [("f", '{"a": 1}')]),
    # ... or before the next call.
    ('<tool_call>{"name": "f", "arguments": {}}<tool_call>{"name": "g", "arguments": {}}'
     '</tool_call>', [("f", "{}"), ("g", "{}")]),
    # "arguments" before "name": sent whole once the name is known.
    ('<tool_call>\n{"arguments": {"a": [1]}, "name": "f"}\n</tool_call>', [("f", '{"a": [1]}')]),
    # Arguments double-encoded as a JSON string.
    ('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', [("f", '{"a": 1}')]),
    # "parameters" instead of "arguments" (Llama-style fine-tunes).
    ('<tool_call>\n{"name": "f", "parameters": {"a": 1}}\n</tool_call>', [("f", '{"a": 1}')]),
    # No arguments at all, and one closing brace too many.
    ('<tool_call>\n{"name": "f"}}\n</tool_call>', [("f", "{}")]),
])
def test_variants_seen_in_the_wild(text: str, expected: list[tuple[str, str]]) -> None:
    parsed = same_everywhere(choice_parser, text)
    assert parsed.calls == expected and parsed.content == ""


@pytest.mark.parametrize("text", [
    "Plain answer with <b>tags</b>, a lone <tool and trailing space.  \n",
    "Ends with the start of a marker <tool_ca",
    "A closing tag alone </tool_call> is just text",
])
def test_text_without_calls_is_untouched(text: str) -> None:
    parsed = same_everywhere(choice_parser, text)
    assert parsed.message() == (text, "", [])


def test_output_cut_inside_a_call() -> None:
    # Cut before the name was known: nothing was announced, the text is content.
    cut_early = '<tool_call>\n{"name": "get_wea'
    assert run(choice_parser(), [cut_early]).message() == (cut_early, "", [])
    # Cut inside the arguments: the client already has the call; it stays (finish "length").
    cut_late = '<tool_call>\n{"name": "f", "arguments": {"city": "Par'
    assert run(choice_parser(), [cut_late]).calls == [("f", '{"city": "Par')]


def test_calls_inside_reasoning_are_reasoning() -> None:
    text = ('<think>\nMaybe <tool_call>{"name": "x"}</tool_call>?\n</think>\n\n'
            '<tool_call>\n{"name": "y", "arguments": {}}\n</tool_call>')
    parsed = run(choice_parser(), [text])
    assert parsed.reasoning == 'Maybe <tool_call>{"name": "x"}</tool_call>?'
    assert parsed.calls == [("y", "{}")]


def test_without_a_tool_parser_everything_is_content() -> None:
    parsed = run(ChoiceParser(ReasoningParser(), None), [QWEN3_CALL])
    assert parsed.calls == [] and parsed.content.startswith("<tool_call>")

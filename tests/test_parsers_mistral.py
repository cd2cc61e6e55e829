"""Mistral tool calls: `[TOOL_CALLS]name[ARGS]{...}` (v11+) and the v3 JSON array."""

from __future__ import annotations

import pytest
from parser_helpers import run, same_everywhere

from swan_serve.server.parsers import ChoiceParser
from swan_serve.server.parsers.mistral import MistralParser


def parser() -> ChoiceParser:
    return ChoiceParser(None, MistralParser())


@pytest.mark.parametrize("text, content, calls", [
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": [1, 2]}', "",
     [("get_weather", '{"city": "Paris", "days": [1, 2]}')]),
    ('Checking both.[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich"}'
     '[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS] {"tz": "UTC"}', "Checking both.",
     [("get_weather", '{"city": "Zürich"}'), ("get_time", '{"tz": "UTC"}')]),
    ('[TOOL_CALLS] [{"name": "a", "arguments": {"x": "}"}}, {"name": "b", "arguments": {}}]',
     "", [("a", '{"x": "}"}'), ("b", "{}")]),
])
def test_calls(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    parsed = same_everywhere(parser, text)
    assert parsed.message() == (content, "", calls)


def test_parallel_calls_are_indexed() -> None:
    text = '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"y": 2}}]'
    opening = [f for f in run(parser(), list(text)).fragments if "id" in f]
    assert [(f["index"], f["function"]["name"]) for f in opening] == [(0, "a"), (1, "b")]


@pytest.mark.parametrize("text", ["[TOOL_CALLS]not a name![ARGS]{}",
                                  "[TOOL_CALLS]f[ARGS]not json"])
def test_malformed_calls(text: str) -> None:
    parsed = same_everywhere(parser, text)
    if parsed.calls:  # the name was valid: the call was announced, its arguments were not
        assert parsed.calls == [("f", "")]
    else:
        assert parsed.content == text

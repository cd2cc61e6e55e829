"""Qwen3.5 / Qwen3-Coder XML tool calls: parsing, schema-typed values, streaming."""

from __future__ import annotations

import json
from typing import Any

import pytest
from parser_helpers import run, same_everywhere, small_tokenizer

from swan_serve.server.parsers import ChoiceParser, ReasoningParser
from swan_serve.server.parsers.qwen_xml import QwenXmlParser
from swan_serve.server.parsers.schema_values import convert

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                       "unit": {"enum": ["c", "f"]}, "hourly": {"type": "boolean"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "write_file", "parameters": {
        "type": "object",
        "properties": {"path": {"type": "string"}, "content": {"type": "string"},
                       "mode": {"type": ["integer", "null"]},
                       "options": {"type": "object"}, "lines": {"type": "array"}}}}},
]
# Qwen3.5: the template opened the reasoning block, so the output starts inside it.
QWEN35_CALL = (
    "The user wants the forecast for Zürich. I'll call get_weather.\n</think>\n\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nZürich\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n<parameter=hourly>\nTrue\n</parameter>\n"
    "</function>\n</tool_call>"
)
CODER_CALLS = (
    "I'll write the file.\n\n<tool_call>\n<function=write_file>\n<parameter=path>\nsrc/app.ts"
    "\n</parameter>\n<parameter=content>\nconst a = `<div class=\"x\">${b}</div>`;\n"
    "if (a < 3 && b > 2) {\n  return '\\n';\n}\n\n</parameter>\n<parameter=mode>\nnull\n"
    "</parameter>\n<parameter=options>\n{'overwrite': True, \"encoding\": \"utf-8\"}\n"
    "</parameter>\n<parameter=lines>\n[1, 2]\n</parameter>\n</function>\n</tool_call>\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\n東京 🌧️\n</parameter>\n"
    "<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>"
)


def qwen35_parser() -> ChoiceParser:
    return ChoiceParser(ReasoningParser(starts_inside=True), QwenXmlParser(TOOLS))


def coder_parser() -> ChoiceParser:
    return ChoiceParser(None, QwenXmlParser(TOOLS))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


def test_qwen35_call_with_reasoning_opened_in_the_prompt(tokenizer: Any) -> None:
    parsed = same_everywhere(qwen35_parser, QWEN35_CALL, tokenizer)
    assert parsed.reasoning == "The user wants the forecast for Zürich. I'll call get_weather."
    assert parsed.content == ""
    [(name, arguments)] = parsed.calls
    assert name == "get_weather"
    assert arguments == '{"city": "Zürich", "days": 3, "hourly": true}'


def test_coder_calls_with_code_and_typed_values(tokenizer: Any) -> None:
    parsed = same_everywhere(coder_parser, CODER_CALLS, tokenizer)
    assert parsed.content == "I'll write the file."
    [(first, first_args), (second, second_args)] = parsed.calls
    assert (first, second) == ("write_file", "get_weather")
    assert json.loads(first_args) == {
        "path": "src/app.ts",
        "content": "const a = `<div class=\"x\">${b}</div>`;\nif (a < 3 && b > 2) {\n"
                   "  return '\\n';\n}\n",
        "mode": None,
        "options": {"overwrite": True, "encoding": "utf-8"},  # a Python literal, converted
        "lines": [1, 2],
    }
    assert json.loads(second_args) == {"city": "東京 🌧️", "unit": "c"}


@pytest.mark.parametrize("schema, raw, expected", [
    ({"type": "string"}, "007", "007"),
    ({"type": "integer"}, "42", 42),
    ({"type": "integer"}, "4.0", 4),
    ({"type": "integer"}, "three", "three"),  # does not convert: the text is kept
    ({"type": "number"}, "2.5e3", 2500.0),
    ({"type": "boolean"}, "FALSE", False),
    ({"type": ["integer", "null"]}, "None", None),
    ({"type": ["string", "integer"]}, "12", 12),
    ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "x1", "x1"),
    ({"type": "object"}, '{"a": [1, "b"]}', {"a": [1, "b"]}),
    ({"type": "array"}, "(1, 2)", [1, 2]),
    ({"type": "array"}, "not a list", "not a list"),
    ({"enum": ["a", "b"]}, "a", "a"),
    ({"enum": [1, 2]}, "2", 2),
    (None, '{"free": true}', {"free": True}),  # undeclared: structured values recognised
    (None, "42", "42"),  # ... everything else stays text
])
def test_values_convert_by_the_schema(schema: dict | None, raw: str, expected: Any) -> None:
    value = convert(raw, schema)
    assert value == expected and type(value) is type(expected)


def test_plain_string_values_stream_before_the_parameter_closes() -> None:
    parser = QwenXmlParser(TOOLS)
    head = "<tool_call>\n<function=write_file>\n<parameter=content>\nline one\nline"
    fragments = parser.feed(head).tool_calls
    sent = "".join(f["function"]["arguments"] for f in fragments)
    assert sent == '{"content": "line one\\nline'
    rest = parser.feed(" two\n</parameter>\n</function>\n</tool_call>").tool_calls
    sent += "".join(f["function"]["arguments"] for f in rest)
    assert json.loads(sent) == {"content": "line one\nline two"}


def test_bare_function_block_without_wrapper() -> None:
    text = "<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>"
    parsed = same_everywhere(coder_parser, text)
    assert parsed.message() == ("", "", [("get_weather", '{"city": "Oslo"}')])


@pytest.mark.parametrize("text, expected", [
    # The closing </tool_call> left out.
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>",
     ('{"city": "Rome"}')),
    # No parameters.
    ("<tool_call>\n<function=get_weather>\n</function>\n</tool_call>", "{}"),
    # Cut off inside a value: the arguments stay valid JSON.
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRo", '{"city": "Ro"}'),
    ("<tool_call>\n<function=get_weather>\n<parameter=days>\n1", '{"days": 1}'),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<param",
     '{"city": "Rome"}'),
])
def test_incomplete_calls_keep_valid_arguments(text: str, expected: str) -> None:
    parsed = same_everywhere(coder_parser, text)
    [(_, arguments)] = parsed.calls
    assert arguments == expected
    json.loads(arguments)


@pytest.mark.parametrize("text", [
    "<tool_call>\nI am not a function</tool_call>",
    "<tool_call>\n<function=bad name\nwith newline>\n</function>\n</tool_call>",
])
def test_malformed_calls_are_content(text: str) -> None:
    parsed = same_everywhere(coder_parser, text)
    assert parsed.message() == (text, "", [])


def test_unknown_function_keeps_raw_strings() -> None:
    text = ("<tool_call>\n<function=other>\n<parameter=n>\n5\n</parameter>\n</function>\n"
            "</tool_call>")
    assert run(coder_parser(), [text]).calls == [("other", '{"n": "5"}')]

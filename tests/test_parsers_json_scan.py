"""The incremental JSON validator behind streamed tool-call arguments."""

from __future__ import annotations

import json

import pytest

from swan_serve.server.parsers.json_scan import JsonScanner, scan_complete

VALID = [
    '{}', '[]', '""', '0', '-0', '1.5e-3', '-12E+2', 'true', 'false', 'null',
    '{"a": [1, {"b": null}], "c": "x\\"}\\\\", "d": "\\u00e9"}',
    ' \n{ "k" : [ ] , "e" : { } }',
    '"東京 🌧️"',
]
INVALID = ['{a: 1}', '[1,]', '{"a" 1}', '01', '1.', '-', '.5', 'tru', '"\\x"', '"a\nb"',
           '{"a": 1,}', '[1 2]', '}', "'single'", '{"a": 1}}']


@pytest.mark.parametrize("text", VALID)
def test_valid_values_complete_at_their_end(text: str) -> None:
    json.loads(text)  # the test's own premise
    scanner = JsonScanner()
    used = scanner.feed(text)
    complete = scanner.done or scanner.finish()
    assert complete and not scanner.error and used == len(text)


@pytest.mark.parametrize("text", VALID)
def test_every_prefix_is_a_valid_prefix(text: str) -> None:
    for cut in range(len(text)):
        scanner = JsonScanner()
        for ch in text[:cut]:  # one character at a time
            assert scanner.feed(ch) == 1 or scanner.done
        assert not scanner.error


@pytest.mark.parametrize("text", INVALID)
def test_invalid_values_are_caught(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)  # the test's own premise
    scanner = JsonScanner()
    used = scanner.feed(text)
    complete = scanner.done and used == len(text)
    assert scanner.error or not (complete or (used == len(text) and scanner.finish()))


def test_the_value_ends_where_its_json_ends() -> None:
    text = '{"x": "}"}}\n</tool_call>'
    assert scan_complete(text) == len('{"x": "}"}')
    assert scan_complete('{"x": ') is None
    scanner = JsonScanner()
    assert scanner.feed("12,") == 2 and scanner.done  # a number ends at what follows it

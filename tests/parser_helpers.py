"""Helpers for the output-parser tests: feed text in many cuttings, collect the message."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swan_serve.server.chat.output import OutputParser
from swan_serve.server.parsers import assemble_calls


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    fragments: list[dict[str, Any]] = field(default_factory=list)

    @property
    def calls(self) -> list[dict[str, Any]]:
        """message.tool_calls without the random ids: [(name, arguments), ...]."""
        return [(c["function"]["name"], c["function"]["arguments"])
                for c in assemble_calls(self.fragments)]

    def message(self) -> tuple[str, str, list[tuple[str, str]]]:
        return self.content, self.reasoning, self.calls


def run(parser: OutputParser, pieces: list[str]) -> Parsed:
    out = Parsed()
    for piece in pieces:
        _add(out, parser.feed(piece))
    _add(out, parser.finish())
    return out


def _add(out: Parsed, delta: Any) -> None:
    out.content += delta.content
    out.reasoning += delta.reasoning
    out.fragments += delta.tool_calls


def cuttings(text: str, seed: int = 0) -> Iterator[list[str]]:
    """The text whole, one character at a time, in fixed sizes and at random places."""
    yield [text]
    for size in (1, 2, 3, 5, 8, 13):
        yield [text[i:i + size] for i in range(0, len(text), size)]
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def token_pieces(tokenizer: Any, text: str) -> list[str]:
    """The pieces the server's streaming detokenizer makes of `text`, token by token
    (multi-byte characters split across tokens come out whole, as they do in the server)."""
    detokenizer = tokenizer.detokenizer
    pieces = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        detokenizer.add_token(token)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    pieces.append(detokenizer.last_segment)
    return [p for p in pieces if p]


def small_tokenizer(folder: Path) -> Any:
    """mlx_lm's wrapper around the fixture factory's small trained tokenizer."""
    from mlx_lm.utils import load_tokenizer

    from swan_serve.quant.fixtures.tokenizer import write_small_tokenizer

    write_small_tokenizer(folder)
    return load_tokenizer(folder)


def same_everywhere(make: Callable[[], OutputParser], text: str,
                    tokenizer: Any | None = None) -> Parsed:
    """Parses `text` in every cutting (and token by token); all must give one message."""
    whole = run(make(), [text])
    pieces = list(cuttings(text))
    if tokenizer is not None:
        pieces.append(token_pieces(tokenizer, text))
    for cut in pieces:
        assert run(make(), cut).message() == whole.message(), cut
    return whole


# Tools whose every argument is bounded (integer range, short string, enum, boolean), so
# a constrained call ends within a few tokens even from random weights.
BOUNDED_TOOLS = [
    {"type": "function", "function": {"name": "set_alarm", "parameters": {
        "type": "object",
        "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                       "label": {"type": "string", "maxLength": 8},
                       "loud": {"type": "boolean"}},
        "required": ["hour", "label", "loud"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"color": {"enum": ["red", "green"]}},
        "required": ["color"], "additionalProperties": False}}},
]

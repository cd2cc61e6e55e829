"""Token ids -> text deltas for one sequence, with stop strings matched on text.

Stop strings are never emitted: text that could still grow into a stop string is held back
until the next token shows it does not (or the sequence ends for another reason).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class StopMatcher:
    """Finds the first stop string in a stream of text pieces."""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._longest = max((len(s) for s in stops), default=0)
        self._pending = ""
        self.matched: str | None = None  # the stop string that ended the sequence

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string ended the sequence)."""
        if not self._stops:
            return text, False
        buffer = self._pending + text
        first = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if first >= 0:
            self._pending = ""
            self.matched = next(s for s in self._stops if buffer.startswith(s, first))
            return buffer[:first], True
        held = self._held_suffix(buffer)
        self._pending = buffer[len(buffer) - held :]
        return buffer[: len(buffer) - held], False

    def flush(self) -> str:
        """The held-back text, once the sequence ended without a stop-string match."""
        text, self._pending = self._pending, ""
        return text

    def _held_suffix(self, buffer: str) -> int:
        for size in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0


def fast_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """ids -> text, keeping special tokens (output parsers need to see them).

    A transformers fast tokenizer's Python decode costs ~40 us a call; its Rust backend
    ~1 us. The backend gives the same text unless the tokenizer cleans up spaces.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=False)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


class IncrementalDecoder:
    """Text of generated tokens, exactly as decoding the whole sequence would give it.

    Decodes a short window that starts a few tokens back (in the prompt at first), so a
    leading space survives tokenizers that drop it at the start of a decode, and holds
    text back while it ends in an incomplete UTF-8 character.
    """

    def __init__(self, tokenizer: Any, prompt_tail: list[int]):
        self._decode_ids = fast_decoder(tokenizer)
        self._tokens = list(prompt_tail)
        self._start = 0  # window start
        self._read = len(self._tokens)  # tokens before this are already emitted
        self._emitted = self._decode(self._start, self._read)

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._decode_ids(self._tokens[start:end])

    def add(self, token: int) -> str:
        self._tokens.append(token)
        text = self._decode(self._start, len(self._tokens))
        if len(text) <= len(self._emitted) or text.endswith("\ufffd"):
            return ""
        new = text[len(self._emitted):]
        self._start, self._read = self._read, len(self._tokens)
        self._emitted = self._decode(self._start, self._read)
        return new

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character stays U+FFFD)."""
        text = self._decode(self._start, len(self._tokens))
        return text[len(self._emitted):] if len(text) > len(self._emitted) else ""


class SequenceText:
    """Incremental decoding + stop strings for one sequence (generation thread only)."""

    def __init__(self, decoder: IncrementalDecoder, stops: tuple[str, ...]):
        self._decoder = decoder
        self._stops = StopMatcher(stops)

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the sequence, if one did."""
        return self._stops.matched

    def add(self, token: int) -> tuple[str, bool]:
        """Adds a generated token; returns (new text, stop string hit)."""
        return self._stops.feed(self._decoder.add(token))

    def finish(self, token: int | None) -> tuple[str, bool]:
        """Ends the sequence, adding `token` first when it is text (not an end-of-sequence)."""
        text = self._decoder.add(token) if token is not None else ""
        text, stopped = self._stops.feed(text + self._decoder.flush())
        if stopped:
            return text, True
        return text + self._stops.flush(), False

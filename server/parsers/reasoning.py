"""Reasoning blocks: `<think>...</think>` -> reasoning_content, the rest -> content.

Two ways a block starts: the model writes `<think>` first (Qwen3), or the chat template
already opened it at the end of the prompt (Qwen3.5), in which case the output starts inside
the block (`starts_inside=True`; see `opened_in_prompt`). The line breaks the templates put
around the markers are layout: the reasoning and the content after it are trimmed of them.
Only a block at the very start counts; a `<think>` later in the answer is just text.
"""

from __future__ import annotations

from .base import held_suffix

THINK_START = "<think>"
THINK_END = "</think>"


def opened_in_prompt(prompt_tail: str, start: str = THINK_START, end: str = THINK_END) -> bool:
    """Does the rendered prompt (its last few tokens as text) end inside a reasoning block?"""
    return prompt_tail.rfind(start) > prompt_tail.rfind(end)


class ReasoningParser:
    """Splits one choice's text into (reasoning, content) pieces as it streams."""

    def __init__(self, start: str = THINK_START, end: str = THINK_END,
                 starts_inside: bool = False):
        self._start = start
        self._end = end
        # "opening": may still turn out to start with a block; "reasoning"; "content".
        self._state = "reasoning" if starts_inside else "opening"
        self._buffer = ""
        self._reasoning_started = False  # leading line breaks of the reasoning are dropped
        self._held_space = ""  # trailing whitespace of the reasoning, dropped at its end
        self._trim_content = False  # drop the whitespace right after the block

    def feed(self, text: str) -> tuple[str, str]:
        """Returns (reasoning, content) for this piece of text."""
        self._buffer += text
        reasoning = content = ""
        while self._buffer:
            if self._state == "opening":
                stripped = self._buffer.lstrip()
                if stripped.startswith(self._start):
                    self._buffer = stripped[len(self._start):]
                    self._state = "reasoning"
                    continue
                if not stripped or self._start.startswith(stripped):
                    break  # not decided yet
                self._state = "content"
            elif self._state == "reasoning":
                piece, ended = self._read_reasoning()
                reasoning += piece
                if not ended:
                    break
            else:
                content += self._content(self._buffer)
                self._buffer = ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The end of the text: whatever was held back goes where it belongs."""
        text, self._buffer = self._buffer, ""
        if self._state == "reasoning":  # never closed (cut off): all of it was reasoning
            return self._reasoning_text(text), ""
        return "", self._content(text)

    def _read_reasoning(self) -> tuple[str, bool]:
        pos = self._buffer.find(self._end)
        if pos >= 0:
            piece = self._reasoning_text(self._buffer[:pos])
            self._buffer = self._buffer[pos + len(self._end):]
            self._held_space = ""
            self._state = "content"
            self._trim_content = True
            return piece, True
        keep = held_suffix(self._buffer, (self._end,))
        piece = self._reasoning_text(self._buffer[: len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return piece, False

    def _reasoning_text(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip("\n")
            if not text:
                return ""
            self._reasoning_started = True
        text = self._held_space + text
        kept = text.rstrip()
        self._held_space = text[len(kept):]
        return kept

    def _content(self, text: str) -> str:
        if self._trim_content:
            text = text.lstrip()
            if text:
                self._trim_content = False
        return text

"""Rendered prompt text -> token ids, tokenizing each stretch between added tokens once.

Agents resend the same system prompt and tool list every turn, and the chat template
renders them into the same text each time, between the same added tokens (<|im_start|>,
<|im_end|>, ...). A tokenizer cuts text at its added tokens before anything else and
tokenizes the stretches between them independently, so a long stretch seen before can
reuse its ids: a 30k-token agent prompt is then tokenized only in its new parts.

That independence is a property of the tokenizer, so it is checked against the tokenizer
itself when the encoder is made (on text shaped like a chat prompt, and through the chat
template when there is one); if they disagree, every prompt is tokenized whole.
"""

from __future__ import annotations

import logging
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("swan_serve.prompts")

# Shorter stretches tokenize in microseconds: not worth a cache entry.
_MIN_CACHED_CHARS = 256
# Cached token ids in all (8 bytes each): bounds the memory to ~16 MB.
_MAX_CACHED_TOKENS = 2_000_000

_CHECK_TEXT = (
    "You are a careful assistant.\n\n# Tools\n\n{\"type\": \"function\", \"name\": \"f_1\"}"
    "  two  spaces, a tab\t, ünïcödé, 数字 123 4567, emoji 🙂 and trailing space "
)
_CHECK_MESSAGES = [
    {"role": "system", "content": _CHECK_TEXT * 3},
    {"role": "user", "content": " Hello there.  What is 12 * 34?\n"},
    {"role": "assistant", "content": "It is 408.\n\nAnything else? "},
    {"role": "user", "content": "\nNo, thanks! 🙂"},
]


class PromptEncoder:
    def __init__(self, tokenizer: Any, min_cached_chars: int = _MIN_CACHED_CHARS,
                 max_cached_tokens: int = _MAX_CACHED_TOKENS):
        self._tokenizer = tokenizer  # mlx_lm's TokenizerWrapper or a transformers tokenizer
        self._min_cached_chars = min_cached_chars
        self._max_cached_tokens = max_cached_tokens
        get_added = getattr(tokenizer, "get_added_vocab", None)
        added: dict[str, int] = dict(get_added()) if get_added else {}
        self._added_ids = added
        self._split = (re.compile("(" + "|".join(re.escape(t) for t in
                                                 sorted(added, key=len, reverse=True)) + ")")
                       if added else None)
        self._cache: OrderedDict[str, array] = OrderedDict()
        self._cached_tokens = 0
        self._lock = threading.Lock()
        self.piecewise = self._split is not None and self._agrees()
        if not self.piecewise:
            log.info("prompt tokenization: whole prompts (the tokenizer's added tokens do "
                     "not split text independently)")

    @property
    def cached_tokens(self) -> int:
        return self._cached_tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the tokenizer gives them without special-token additions."""
        return self._pieces(text, self._stretch) if self.piecewise else self._whole(text)

    def _whole(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _pieces(self, text: str, stretch: Callable[[str], Sequence[int]]) -> list[int]:
        assert self._split is not None
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:  # an added token (the split's captured group)
                ids.append(self._added_ids[part])
            elif part:
                ids.extend(stretch(part))
        return ids

    def _stretch(self, text: str) -> Sequence[int]:
        if len(text) < self._min_cached_chars:
            return self._whole(text)
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit
        ids = array("q", self._whole(text))
        if len(ids) > self._max_cached_tokens // 4:
            return ids  # one stretch may not take most of the cache
        with self._lock:
            if text not in self._cache:
                self._cache[text] = ids
                self._cached_tokens += len(ids)
            while self._cached_tokens > self._max_cached_tokens:
                _, dropped = self._cache.popitem(last=False)
                self._cached_tokens -= len(dropped)
        return ids

    def _agrees(self) -> bool:
        """Whether tokenizing between added tokens gives what the tokenizer gives whole,
        and (with a chat template) what the template's own tokenization gives."""
        added = list(self._added_ids)
        # Whitespace on both sides of every added token: tokens that strip it are caught.
        samples = [_CHECK_TEXT, "".join(f"{t}{_CHECK_TEXT}\n{t} x {t}\n" for t in added)]
        try:
            if any(self._pieces(s, self._whole) != self._whole(s) for s in samples):
                return False
        except Exception:  # an odd tokenizer: be safe
            log.exception("the piecewise tokenization check failed")
            return False
        if not getattr(self._tokenizer, "has_chat_template", False):
            return True
        try:
            rendered = self._tokenizer.apply_chat_template(
                _CHECK_MESSAGES, add_generation_prompt=True, tokenize=False)
            direct = list(self._tokenizer.apply_chat_template(
                _CHECK_MESSAGES, add_generation_prompt=True, tokenize=True))
        except Exception:  # a template that refuses these messages: the samples decide
            return True
        return self._pieces(rendered, self._whole) == direct

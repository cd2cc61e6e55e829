"""The text and bytes of a single token, for logprobs.

Decoding one token alone loses its leading space with SentencePiece-style tokenizers, so a
token is decoded after a fixed anchor token and the anchor's text is cut off. Tokens that
are one raw byte (byte fallback `<0xE2>`) report that byte, not U+FFFD.
"""

from __future__ import annotations

import re
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenText:
    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        anchor = tokenizer.encode("a", add_special_tokens=False)
        self._anchor = anchor[-1:] if anchor else []
        self._anchor_text = tokenizer.decode(self._anchor) if self._anchor else ""
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        found = self._cache.get(token)
        if found is None:
            found = self._cache[token] = self._compute(token)
        return found

    def _compute(self, token: int) -> tuple[str, list[int]]:
        piece = self._tokenizer.convert_ids_to_tokens(token)
        match = _BYTE_TOKEN.match(piece) if isinstance(piece, str) else None
        if match:
            raw = [int(match.group(1), 16)]
            return bytes(raw).decode("utf-8", errors="replace"), raw
        text = self._tokenizer.decode(self._anchor + [token])
        if text.startswith(self._anchor_text):
            text = text[len(self._anchor_text):]
        else:
            text = self._tokenizer.decode([token])
        return text, list(text.encode("utf-8"))

"""Constrained decoding with llguidance: grammars -> per-sequence logits processors.

One `GrammarTokenizer` per loaded model (llguidance's view of the vocabulary; building it
takes about a second for a 150k vocabulary, so build it once, early). Per request a grammar
is compiled and checked once (`compile_grammar`, off the event loop); each choice then gets
its own matcher and `ConstrainedDecoding` processor, with mlx_lm's logits-processor
signature `processor(tokens, logits) -> logits`, where `tokens` is the sequence's context
(prompt + generated, 1-D) and `logits` its row (1, vocab) of the batch.

Reasoning models think before they answer: the processor leaves a reasoning block free
(up to a budget, then it closes it) and constrains only what follows it.
"""

from __future__ import annotations

import copy
import enum
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.numpy
import mlx.core as mx
import numpy as np

log = logging.getLogger("swan_serve.grammar")


class GrammarError(ValueError):
    """The grammar (a JSON schema, a tool's parameters) cannot be used; the message says why."""


class GrammarTokenizer:
    """llguidance's tokenizer for one model, built on first use (thread-safe)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._built: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def ll(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._built is None:
                self._built = self._build()
            return self._built

    def _build(self) -> llguidance.LLTokenizer:
        hf = getattr(self._tokenizer, "_tokenizer", self._tokenizer)  # mlx_lm's wrapper
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise GrammarError("constrained decoding needs a fast (tokenizer.json) tokenizer")
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        size = max(self.vocab_size, len(hf))
        return llguidance.LLTokenizer(backend.to_str(), n_vocab=size, eos_token=self.eos_ids)

    def single_token(self, text: str) -> int | None:
        """The id of `text` when the tokenizer has it as one token, else None."""
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def marker(self, text: str) -> str:
        """`text` as a Lark element: the token itself when it is one added token, else text."""
        token = self.single_token(text)
        if token is not None and self.ll.is_special_token(token):
            return f"<[{token}]>"
        return _lark_string(text)


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True)
class CompiledGrammar:
    """A checked grammar, ready to give each sequence its own matcher."""

    tokenizer: GrammarTokenizer
    prototype: llguidance.LLMatcher

    def new_matcher(self) -> llguidance.LLMatcher:
        return self.prototype.deep_copy()


def compile_grammar(tokenizer: GrammarTokenizer, lark: str) -> CompiledGrammar:
    """Checks and compiles a Lark grammar (which may embed `%json {...}` schemas)."""
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar,
                                                                          tokenizer.ll)
    if is_error:
        raise GrammarError(messages[0] if messages else "invalid grammar")
    matcher = llguidance.LLMatcher(tokenizer.ll, grammar, log_level=0)
    if matcher.is_error():
        raise GrammarError(matcher.get_error())
    return CompiledGrammar(tokenizer, matcher)


@dataclass(frozen=True)
class ThinkTokens:
    start: int
    end: int


class Phase(enum.Enum):
    MAY_THINK = "may_think"  # first token: the answer, or the start of a reasoning block
    REASONING = "reasoning"  # free text until the end marker (or the budget)
    GRAMMAR = "grammar"  # constrained
    FAILED = "failed"  # the matcher rejected a token: end the sequence


class ConstrainedDecoding:
    """The logits processor of one sequence (see the module docstring)."""

    def __init__(self, grammar: CompiledGrammar, phase: Phase,
                 think: ThinkTokens | None = None, reasoning_budget: int | None = 0):
        """reasoning_budget: tokens a reasoning block may take before it is closed, and no
        end of sequence inside it; None: reasoning is left free (tool_choice "auto")."""
        self._matcher = grammar.new_matcher()
        self._tokenizer = grammar.tokenizer
        self._phase = phase if think is not None else Phase.GRAMMAR
        self._think = think
        self._budget = reasoning_budget
        self._reasoning_tokens = 0
        self._seen: int | None = None  # context length at the last call
        words = (grammar.tokenizer.ll.vocab_size + 31) // 32
        self._mask = np.zeros((1, words), dtype=np.int32)

    @property
    def phase(self) -> Phase:
        return self._phase

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        length = tokens.shape[-1]
        if self._seen is not None and length > self._seen:
            for token in tokens.reshape(-1)[self._seen:].tolist():
                self._advance(int(token))
        self._seen = length
        allowed = self._allowed(logits.shape[-1])
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def _advance(self, token: int) -> None:
        if self._phase is Phase.MAY_THINK:
            assert self._think is not None
            if token == self._think.start:
                self._phase = Phase.REASONING
                return
            self._phase = Phase.GRAMMAR
        if self._phase is Phase.REASONING:
            assert self._think is not None
            self._reasoning_tokens += 1
            if token == self._think.end:
                self._phase = Phase.GRAMMAR
            return
        if self._phase is Phase.GRAMMAR and not self._matcher.consume_token(token):
            log.warning("constrained decoding: token %d rejected (%s); ending the sequence",
                        token, self._matcher.get_error())
            self._phase = Phase.FAILED

    def _allowed(self, vocab: int) -> np.ndarray:
        """The tokens that may come next, as a boolean row over the vocabulary."""
        if self._phase is Phase.REASONING:
            if self._budget is None:
                return np.ones(vocab, dtype=bool)
            if self._reasoning_tokens < self._budget:
                # Free text, but the answer must come: no ending inside the reasoning.
                allowed = np.ones(vocab, dtype=bool)
                allowed[[t for t in self._tokenizer.eos_ids if t < vocab]] = False
                return allowed
            return self._only([self._think.end], vocab)  # type: ignore[union-attr]
        if self._phase is Phase.FAILED:
            return self._only(self._tokenizer.eos_ids, vocab)
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._mask)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")
        allowed = np.zeros(vocab, dtype=bool)
        count = min(vocab, bits.size)
        allowed[:count] = bits[:count].astype(bool)
        if self._phase is Phase.MAY_THINK:
            allowed[self._think.start] = True  # type: ignore[union-attr]
        return allowed

    @staticmethod
    def _only(tokens: list[int], vocab: int) -> np.ndarray:
        allowed = np.zeros(vocab, dtype=bool)
        allowed[[t for t in tokens if t < vocab]] = True
        return allowed

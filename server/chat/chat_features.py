"""What a loaded model offers chat requests: tool calls, reasoning, constrained decoding.

Built once per model (`ChatFeatures.for_tokenizer`), asked three things per request:

    tools = features.check_request(request)             # 400s for bad tools / formats
    parsers = features.parser_factory(tools, prompt)    # one OutputParser per choice
    processors = features.processors(tools, prompt, max_tokens)  # per-choice factory of
                                                         # logits processors (or None)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..parsers import (
    ChoiceParser,
    ReasoningParser,
    ToolFormat,
    opened_in_prompt,
    resolve_format,
)
from .declared_calls import declared_calls_grammar, no_calls_grammar
from .grammar import (
    CompiledGrammar,
    ConstrainedDecoding,
    GrammarError,
    GrammarTokenizer,
    Phase,
    ThinkTokens,
    compile_grammar,
)
from .schema_bounds import bounded, bounded_tools
from .structured import ResponseFormatError, response_format_grammar, response_schema
from .tool_choice import (
    BanTokens,
    ToolChoice,
    ToolChoiceError,
    calls_rules,
    check_tools,
    forced_calls_grammar,
    parse_tool_choice,
)

LogitsProcessor = Callable[[Any, Any], Any]
# Compiled grammars kept for requests that send the same tools or schema again.
_GRAMMAR_CACHE_SIZE = 64
# Prompt tokens decoded to see whether the template opened or closed a reasoning block.
_PROMPT_TAIL_TOKENS = 24


class FeatureError(ValueError):
    """A request asks for something invalid; `param` names the field (for a 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RequestTools:
    """The tool and format parts of one chat request, checked."""

    tools: list[dict[str, Any]]
    choice: ToolChoice
    parallel: bool
    schema: dict[str, Any] | None  # response_format's JSON schema


class ChatFeatures:
    def __init__(self, tokenizer: Any, tool_format: ToolFormat | None,
                 think: tuple[str, str] | None, grammar: GrammarTokenizer):
        self.tokenizer = tokenizer
        self.tool_format = tool_format
        self.think = think
        self.grammar = grammar
        self._grammar_cache: dict[str, CompiledGrammar] = {}  # insertion order = LRU order
        self._cache_lock = threading.Lock()
        self.think_tokens: ThinkTokens | None = None
        if think is not None:
            start, end = (grammar.single_token(m) for m in think)
            if start is not None and end is not None:
                self.think_tokens = ThinkTokens(start, end)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int,
                      tool_parser: str | None = "auto") -> ChatFeatures:
        """tokenizer: mlx_lm's TokenizerWrapper; tool_parser: --tool-call-parser."""
        fmt = resolve_format(tool_parser, getattr(tokenizer, "chat_template", None),
                             tokenizer.get_vocab())
        think = None
        if getattr(tokenizer, "has_thinking", False):
            think = (tokenizer.think_start, tokenizer.think_end)
        eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        return cls(tokenizer, fmt, think, GrammarTokenizer(tokenizer, vocab_size, eos))

    def _compiled(self, lark: str) -> CompiledGrammar:
        """Agents send the same tools every turn: their grammar is compiled once (a few
        tens of ms for a handful of tools) and kept, least recently used out."""
        with self._cache_lock:
            compiled = self._grammar_cache.pop(lark, None)
        if compiled is None:
            compiled = compile_grammar(self.grammar, lark)
        with self._cache_lock:
            self._grammar_cache[lark] = compiled
            while len(self._grammar_cache) > _GRAMMAR_CACHE_SIZE:
                self._grammar_cache.pop(next(iter(self._grammar_cache)))
        return compiled

    def warm_up(self) -> None:
        """Builds llguidance's tokenizer now (about 1 s for 150k tokens), not on the first
        constrained request."""
        _ = self.grammar.ll

    # ------------------------------------------------------------ per request

    def check_request(self, request: Any) -> RequestTools:
        """Reads tools, tool_choice, parallel_tool_calls and response_format of a request."""
        try:
            tools = check_tools(getattr(request, "tools", None))
            choice = parse_tool_choice(getattr(request, "tool_choice", None), tools)
            schema = response_schema(getattr(request, "response_format", None))
        except (ToolChoiceError, ResponseFormatError) as exc:
            raise FeatureError(str(exc), exc.param) from None
        if choice.forced and self.tool_format is None:
            raise FeatureError("This model's chat template shows no tool-call format, so a "
                               "call cannot be forced; start the server with "
                               "--tool-call-parser.", "tool_choice")
        parallel = getattr(request, "parallel_tool_calls", None)
        return RequestTools(tools, choice, parallel is not False, schema)

    def reasoning_start(self, prompt: list[int]) -> str:
        """"open" (the prompt ends inside a reasoning block), "closed" (it ends right after
        an empty one: thinking is off), "free" (the model may open one) or "none"."""
        if self.think is None:
            return "none"
        tail = self.tokenizer.decode(prompt[-_PROMPT_TAIL_TOKENS:])
        if opened_in_prompt(tail, *self.think):
            return "open"
        if tail.rstrip().endswith(self.think[1]):
            return "closed"
        return "free"

    def parser_factory(self, tools: RequestTools, prompt: list[int]) -> Callable[[], ChoiceParser]:
        """One OutputParser per choice: reasoning, then tool calls when the request has tools
        the model may call."""
        inside = self.reasoning_start(prompt) == "open"
        think = self.think
        fmt = self.tool_format if tools.tools and tools.choice.mode != "none" else None

        def make() -> ChoiceParser:
            reasoning = ReasoningParser(*think, starts_inside=inside) if think else None
            return ChoiceParser(reasoning, fmt.parser(tools.tools) if fmt else None)

        return make

    def processors(self, tools: RequestTools, prompt: list[int],
                   max_tokens: int) -> Callable[[], list[LogitsProcessor]] | None:
        """A factory of per-choice logits processors enforcing tool_choice,
        parallel_tool_calls and response_format (SequenceSpec.processors), or None when the
        request constrains nothing. Compiles the grammar now: call this off the event loop;
        it raises FeatureError for schemas that cannot be enforced.

        A reasoning block before a forced answer may use half of max_tokens."""
        ban = self._banned_opening(tools)
        grammar = self._grammar(tools, ban)
        if grammar is None and ban is None:
            return None
        start = self.reasoning_start(prompt)
        phase = {"open": Phase.REASONING, "free": Phase.MAY_THINK}.get(start, Phase.GRAMMAR)
        think = self.think_tokens
        # A forced answer must come, so its reasoning gets a budget; free text keeps it free.
        budget = max_tokens // 2 if tools.choice.forced or tools.schema is not None else None

        def make() -> list[LogitsProcessor]:
            made: list[LogitsProcessor] = []
            if grammar is not None:
                made.append(ConstrainedDecoding(grammar, phase, think, budget))
            if ban is not None:
                made.append(BanTokens([ban]))
            return made

        return make

    def _banned_opening(self, tools: RequestTools) -> int | None:
        """The call's opening marker, when the model may not call anything (tool_choice
        "none", or no tools at all: a model trained to call tools would otherwise write a
        call of a function nobody declared into its content) and the marker is one token.
        With tools and "none", several tokens are excluded by a grammar instead."""
        fmt = self.tool_format
        if fmt is None or (tools.tools and tools.choice.mode != "none"):
            return None
        if tools.schema is not None:
            return None  # the response_format grammar already decides every token
        return self.grammar.single_token(fmt.start)

    def _grammar(self, request_tools: RequestTools, banned: int | None
                 ) -> CompiledGrammar | None:
        fmt = self.tool_format
        choice = request_tools.choice
        # A forced answer (a forced call, response_format) gets bounds where its schema has
        # none, so it ends. Calls the model opens by itself in "auto" keep the schemas as
        # sent: there a long string is the model's choice (an agent writing a whole file).
        tools = RequestTools(
            bounded_tools(request_tools.tools) if choice.forced else request_tools.tools,
            choice, request_tools.parallel, bounded(request_tools.schema))
        try:
            if fmt is not None and tools.tools and tools.schema is None and \
                    choice.mode == "auto":
                lark = declared_calls_grammar(fmt, tools.tools, tools.parallel,
                                              self.grammar.marker)
            elif fmt is not None and tools.tools and choice.mode == "none" and banned is None:
                lark = no_calls_grammar(fmt)
            elif choice.forced:
                assert fmt is not None
                lark = forced_calls_grammar(fmt, tools.tools, choice, tools.parallel,
                                            self.grammar.marker)
            elif tools.schema is not None:
                calls = None
                if fmt is not None and tools.tools and choice.mode == "auto":
                    rules = calls_rules(fmt, tools.tools, ToolChoice("required"),
                                        tools.parallel, self.grammar.marker)
                    calls = "\n".join(rules)
                lark = response_format_grammar(tools.schema, calls)
            else:
                return None
            return self._compiled(lark)
        except GrammarError as exc:
            param = "response_format" if tools.schema is not None else "tools"
            raise FeatureError(f"The {param} schema cannot be enforced: {exc}", param) from None

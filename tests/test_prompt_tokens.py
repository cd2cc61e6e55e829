"""PromptEncoder: tokenizing between added tokens (with reuse) gives exactly the ids the
tokenizer and the chat template give, on real tokenizers; it falls back when that does not
hold; its cache stays inside its bound."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer
from parser_helpers import BOUNDED_TOOLS
from transformers import AddedToken

from swan_serve.quant.fixtures.tokenizer import qwen3_tokenizer_dir, shared_dir
from swan_serve.server.api import openai_chat as p
from swan_serve.server.api.wire import parse_request
from swan_serve.server.chat.prompt_tokens import PromptEncoder
from swan_serve.server.chat.prompts import chat_prompt

SYSTEM = ("You are a coding agent in a user's repository.  Read before you write;\n"
          "never print secrets. Réponds en français si on te parle français. 数字 12345.\n") * 6

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": "  find where the config is parsed \n"},
     {"role": "assistant", "content": "It is parsed in `config.py`, line 12. 🙂"},
     {"role": "user", "content": "Thanks!\n\nNow add a test."}],
    [{"role": "system", "content": SYSTEM},
     {"role": "user", "content": "What is the weather in Paris?"},
     {"role": "assistant", "content": "",
      "tool_calls": [{"type": "function", "id": "call_1", "function": {
          "name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
     {"role": "user", "content": "And tomorrow?"}],
]


def tokenizer_dirs(tiny_checkpoint) -> dict[str, Path]:
    dirs = {"small Qwen3 fixture": tiny_checkpoint("qwen3", tokenizer="small"),
            "llama fixture": tiny_checkpoint("llama")}
    if (qwen3_tokenizer_dir() / "tokenizer.json").is_file():
        dirs["real Qwen3"] = qwen3_tokenizer_dir()
    stories = shared_dir() / "models" / "stories260K"
    if (stories / "tokenizer.json").is_file():
        dirs["stories260K (byte-fallback BPE, BOS)"] = stories
    return dirs


@pytest.fixture(scope="module")
def tokenizers(tiny_checkpoint) -> dict[str, object]:
    return {name: load_tokenizer(path) for name, path in tokenizer_dirs(tiny_checkpoint).items()}


def test_chat_prompts_match_the_template_token_for_token(tokenizers) -> None:
    templated = 0
    for name, tokenizer in tokenizers.items():
        if not tokenizer.has_chat_template:
            continue
        encoder = PromptEncoder(tokenizer, min_cached_chars=16)
        assert encoder.piecewise, name
        for messages in CONVERSATIONS:
            for tools in (None, BOUNDED_TOOLS):
                text = tokenizer.apply_chat_template(messages, tools=tools,
                                                     add_generation_prompt=True, tokenize=False)
                expected = list(tokenizer.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=True, tokenize=True))
                assert encoder.encode(text) == expected, name
                assert encoder.encode(text) == expected, f"{name}, from the cache"
        assert encoder.cached_tokens > 0
        templated += 1
    assert templated > 0


def test_any_text_matches_the_tokenizer(tokenizers) -> None:
    rng = random.Random(0)
    fragments = [" ", "  ", "\n", "\n\n", "\t", "hello", " world", "ü", "数字", "🙂", "123",
                 "4567", "{\"a\": 1}", "def f(x):", "'s", "’"]
    for name, tokenizer in tokenizers.items():
        encoder = PromptEncoder(tokenizer, min_cached_chars=8)
        if not encoder.piecewise:
            continue
        added = list(tokenizer.get_added_vocab())
        for _ in range(150):
            pieces = rng.choices(fragments + added, k=rng.randint(1, 40))
            text = "".join(pieces)
            assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False), (
                name, text)


def test_a_tokenizer_whose_added_tokens_strip_whitespace_is_tokenized_whole(
        tiny_checkpoint) -> None:
    tokenizer = load_tokenizer(tiny_checkpoint("qwen3", tokenizer="small"))
    tokenizer._tokenizer.add_tokens([AddedToken("<sep>", lstrip=True, rstrip=True)])
    encoder = PromptEncoder(tokenizer, min_cached_chars=8)
    assert not encoder.piecewise
    text = SYSTEM + " <sep> " + SYSTEM
    assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False)
    assert encoder.cached_tokens == 0
    # A chat prompt then comes from the template's own tokenization.
    messages = CONVERSATIONS[1]
    request = parse_request(p.ChatCompletionRequest,
                              json.dumps({"model": "m", "messages": messages}).encode())
    assert chat_prompt(tokenizer, encoder, request) == list(tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True))


def test_the_cache_stays_inside_its_bound(tiny_checkpoint) -> None:
    tokenizer = load_tokenizer(tiny_checkpoint("qwen3", tokenizer="small"))
    encoder = PromptEncoder(tokenizer, min_cached_chars=8, max_cached_tokens=2000)
    assert encoder.piecewise
    texts = [f"<|im_start|>system\n{i}: {SYSTEM[:200]}<|im_end|>\n" for i in range(40)]
    first = [encoder.encode(t) for t in texts]
    assert 0 < encoder.cached_tokens <= 2000
    assert sum(map(len, first)) > 2000  # more than fits: some were evicted
    assert [encoder.encode(t) for t in texts] == first
    assert first == [tokenizer.encode(t, add_special_tokens=False) for t in texts]

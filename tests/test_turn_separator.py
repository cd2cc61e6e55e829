"""turn_separator: the tokens every chat template puts between an assistant message and the
next message, derived from the template itself, on the fixture and the real templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from swan_serve.server.chat.prompts import turn_separator

QWEN_SEPARATOR = ["<|im_end|>", "\n", "<|im_start|>", "user", "\n"]

# A template whose tool results have a role of their own: only the turn end and the header's
# opening are common to what follows an answer.
HEADER_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}|{{ m.content }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant|{% endif %}"
)


def pieces(tokenizer: Any, ids: tuple[int, ...]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def check_in_context(tokenizer: Any, separator: tuple[int, ...], next_role: str) -> None:
    """The conversation's next prompt, tokenized by the template, holds the answer's tokens
    then the separator."""
    answer = [{"role": "user", "content": "Ping?"}, {"role": "assistant", "content": "Pong."}]
    after = list(tokenizer.apply_chat_template(
        answer + [{"role": next_role, "content": "More.", "tool_call_id": "c"}], tokenize=True))
    end = tokenizer.encode("Pong.", add_special_tokens=False)
    start = next(i for i in range(len(after)) if after[i:i + len(end)] == end) + len(end)
    assert tuple(after[start:start + len(separator)]) == separator


def test_fixture_template(tiny_checkpoint) -> None:
    tokenizer = load_tokenizer(tiny_checkpoint("qwen3", tokenizer="small"))
    separator = turn_separator(tokenizer)
    assert "".join(pieces(tokenizer, separator)) == "".join(QWEN_SEPARATOR)
    assert separator[0] in tokenizer.eos_token_ids
    for role in ("user", "tool"):
        check_in_context(tokenizer, separator, role)


@pytest.mark.parametrize("template", [
    None,  # the tokenizer's own (Qwen3: thinking and tools)
    "Qwen3.5-397B-A17B/chat_template.jinja",  # thinking blocks before the last answer
    "Qwen3-Coder-30B-A3B-Instruct/chat_template.llama.cpp-vendored.jinja",
])
def test_real_qwen_templates(shared_models_dir: Path, template: str | None) -> None:
    tokenizer = load_tokenizer(shared_models_dir / "Qwen3-8B")
    if template is not None:
        tokenizer._tokenizer.chat_template = (shared_models_dir / template).read_text()
    separator = turn_separator(tokenizer)
    assert pieces(tokenizer, separator) == QWEN_SEPARATOR
    check_in_context(tokenizer, separator, "user")


def test_only_what_every_next_role_shares(tiny_checkpoint) -> None:
    tokenizer = load_tokenizer(tiny_checkpoint("qwen3", tokenizer="small"))
    tokenizer._tokenizer.chat_template = HEADER_TEMPLATE
    assert pieces(tokenizer, turn_separator(tokenizer)) == ["<|im_end|>", "<|im_start|>"]


def test_no_template_no_separator(tiny_checkpoint) -> None:
    tokenizer = load_tokenizer(tiny_checkpoint("qwen3", tokenizer="small"))
    tokenizer._tokenizer.chat_template = None
    tokenizer.has_chat_template = False
    assert turn_separator(tokenizer) == ()
    # A template that ends turns with no end-of-sequence token has nothing to compute ahead.
    tokenizer._tokenizer.chat_template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    tokenizer.has_chat_template = True
    assert turn_separator(tokenizer) == ()

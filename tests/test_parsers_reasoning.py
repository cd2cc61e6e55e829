"""Reasoning blocks -> reasoning_content, whether the model or the template opens them."""

from __future__ import annotations

from typing import Any

import pytest
from parser_helpers import run, same_everywhere, small_tokenizer

from swan_serve.server.parsers import ChoiceParser, ReasoningParser, opened_in_prompt
from swan_serve.server.parsers.hermes_json import HermesJsonParser


def reasoning_only(inside: bool = False) -> ChoiceParser:
    return ChoiceParser(ReasoningParser(starts_inside=inside), None)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return small_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("text, inside, expected", [
    ("<think>\nStep 1.\nStep 2.\n</think>\n\nThe answer is 4.", False,
     ("The answer is 4.", "Step 1.\nStep 2.")),
    ("  <think>Short.</think>Answer.", False, ("Answer.", "Short.")),
    # Qwen3.5: the template opened the block.
    ("Thinking in the prompt's block.\n</think>\n\nDone.", True,
     ("Done.", "Thinking in the prompt's block.")),
    # An empty block (enable_thinking=false on a model that writes one anyway).
    ("<think>\n\n</think>\n\nHi.", False, ("Hi.", "")),
    # Cut off while reasoning: everything was reasoning.
    ("<think>\nStill thinking about ", False, ("", "Still thinking about")),
    ("never closed", True, ("", "never closed")),
    # No block: all content, untouched (a later <think> is just text).
    ("Hello <think> world </think>\n", False, ("Hello <think> world </think>\n", "")),
    ("<thinking is not a marker", False, ("<thinking is not a marker", "")),
])
def test_split(text: str, inside: bool, expected: tuple[str, str], tokenizer: Any) -> None:
    parsed = same_everywhere(lambda: reasoning_only(inside), text, tokenizer)
    assert (parsed.content, parsed.reasoning) == expected


def test_reasoning_streams_while_it_is_written() -> None:
    parser = ReasoningParser()
    assert parser.feed("<think>\nfirst") == ("first", "")
    assert parser.feed(" part\n") == (" part", "")  # the line break waits: it may be the last
    assert parser.feed("more</thi") == ("\nmore", "")
    assert parser.feed("nk>\n\nok") == ("", "ok")
    assert parser.finish() == ("", "")


def test_reasoning_then_tool_call() -> None:
    text = ("<think>\nNeed data.\n</think>\n\n"
            '<tool_call>\n{"name": "f", "arguments": {"q": 1}}\n</tool_call>')
    parsed = run(ChoiceParser(ReasoningParser(), HermesJsonParser()), list(text))
    assert parsed.message() == ("", "Need data.", [("f", '{"q": 1}')])


@pytest.mark.parametrize("tail, opened", [
    ("<|im_start|>assistant\n<think>\n", True),  # Qwen3.5, thinking on
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # thinking off
    ("<|im_start|>assistant\n", False),  # Qwen3: the model opens it
    ("</think>\n\nold answer<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
     "<|im_start|>assistant\n<think>\n", True),
])
def test_opened_in_prompt(tail: str, opened: bool) -> None:
    assert opened_in_prompt(tail) is opened


def _prompt_state(tokenizer: Any, template: str | None, thinking: bool) -> str:
    from swan_serve.server.chat.chat_features import ChatFeatures

    features = ChatFeatures.for_tokenizer(tokenizer, len(tokenizer))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                           add_generation_prompt=True, chat_template=template,
                                           enable_thinking=thinking)
    return features.reasoning_start(list(prompt))


@pytest.mark.parametrize("thinking, state", [(True, "free"), (False, "closed")])
def test_prompt_state_with_the_qwen3_style_template(tokenizer: Any, thinking: bool,
                                                    state: str) -> None:
    assert _prompt_state(tokenizer, None, thinking) == state


@pytest.mark.parametrize("thinking, state", [(True, "open"), (False, "closed")])
def test_prompt_state_with_the_real_qwen35_template(tokenizer: Any, shared_models_dir: Any,
                                                    thinking: bool, state: str) -> None:
    template = (shared_models_dir / "Qwen3.5-397B-A17B" / "chat_template.jinja").read_text()
    assert _prompt_state(tokenizer, template, thinking) == state

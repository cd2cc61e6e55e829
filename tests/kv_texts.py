"""Token sequences the trained test models know, for measuring what quantized KV costs
(tests/test_kv_quality.py and bench/kv.py): each tool model's two training conversations,
prompt and answer, rendered as the server renders them."""

from __future__ import annotations

from typing import Any

from mlx_lm.tokenizer_utils import load as load_tokenizer
from tool_model import WEATHER_TOOL, XML_TEMPLATE, cached_tool_model, first_turn, follow_up

from swan_serve.server.chat.tool_messages import template_messages

STYLES = ("hermes", "xml")


def trained_model(style: str) -> Any:
    return cached_tool_model(style, XML_TEMPLATE if style == "xml" else None)


def conversations(style: str) -> list[list[int]]:
    model = trained_model(style)
    tokenizer = load_tokenizer(model.path)
    texts = []
    for messages, answer in ((first_turn(), model.first_target), (follow_up(), model.answer)):
        prompt = tokenizer.apply_chat_template(template_messages(messages),
                                               tools=[WEATHER_TOOL], add_generation_prompt=True)
        texts.append(list(prompt) + list(tokenizer.encode(answer, add_special_tokens=False)))
    return texts

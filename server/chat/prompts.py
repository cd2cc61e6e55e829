"""Requests -> prompt token ids (chat template or plain text)."""

from __future__ import annotations

import os
from typing import Any

from ..api.errors import invalid
from .prompt_tokens import PromptEncoder
from .request import ChatRequest
from .tool_messages import MessageError, template_messages

# Keys a client may not override through chat_template_kwargs: they change what the
# template call returns, not what the template renders.
_RESERVED_TEMPLATE_KWARGS = {
    "conversation", "messages", "tools", "tokenize", "return_dict", "return_tensors",
    "add_generation_prompt", "continue_final_message", "padding", "truncation",
    "max_length", "return_assistant_tokens_mask", "chat_template", "tokenizer_kwargs",
}


def chat_prompt(tokenizer: Any, encoder: PromptEncoder, request: ChatRequest
                ) -> list[int]:
    """The request's messages through the model's chat template, as token ids: the text
    between added tokens tokenized through `encoder` (which reuses stretches seen before)
    where that is exact, else the template's own tokenization."""
    try:
        messages = template_messages(request.messages)
    except MessageError as exc:
        raise invalid(str(exc), exc.param, exc.code) from None
    template_kwargs = dict(request.chat_template_kwargs or {})
    for key in template_kwargs:
        if key in _RESERVED_TEMPLATE_KWARGS:
            raise invalid(f"chat_template_kwargs may not set '{key}'.", "chat_template_kwargs")
    tools = request.tools if request.tool_choice != "none" else None
    if not tokenizer.has_chat_template:
        return list(tokenizer.encode(_plain_chat(messages)))
    try:
        rendered = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=not encoder.piecewise,
            **template_kwargs
        )
    except Exception as exc:  # jinja errors: the template refused these messages
        raise invalid(f"The chat template rejected the messages: {exc}", "messages") from None
    return encoder.encode(rendered) if encoder.piecewise else list(rendered)


# A finished exchange and three ways a conversation goes on: two user messages that differ
# from their first character, and a tool result. The text a template renders between the
# assistant's message and all three of these is what follows every assistant turn.
_ANSWER = "Hello."
_EXCHANGE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _ANSWER}]
_NEXT_MESSAGES = [
    {"role": "user", "content": "What next?"},
    {"role": "user", "content": "7 + 7 = ?"},
    {"role": "tool", "tool_call_id": "call_0", "content": "{\"ok\": true}"},
]


def turn_separator(tokenizer: Any) -> tuple[int, ...]:
    """The tokens the chat template puts after an assistant message and before the next
    message's content, whoever sends it, starting with the assistant's turn-end token (for
    Qwen: <|im_end|> \\n <|im_start|> user \\n). Empty when there is no such fixed text or
    its tokens are not the same in every rendering."""
    if not getattr(tokenizer, "has_chat_template", False):
        return ()
    between, renders = [], []
    for message in _NEXT_MESSAGES:
        try:
            text = tokenizer.apply_chat_template(_EXCHANGE + [message], tokenize=False,
                                                 add_generation_prompt=False)
            ids = tokenizer.apply_chat_template(_EXCHANGE + [message], tokenize=True,
                                                add_generation_prompt=False)
        except Exception:  # e.g. a template that wants tool calls before a tool message
            continue
        start = text.rfind(_ANSWER) + len(_ANSWER)
        end = text.find(message["content"], start)
        if start < len(_ANSWER) or end < 0:
            continue
        between.append(text[start:end])
        renders.append(list(ids))
    if len(between) < 2:
        return ()
    separator = list(tokenizer.encode(os.path.commonprefix(between), add_special_tokens=False))
    if not separator or separator[0] not in set(tokenizer.eos_token_ids):
        return ()
    # Tokenized alone it must be what the template's own tokenization has in context.
    if not all(_contains(ids, separator) for ids in renders):
        return ()
    return tuple(separator)


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def _plain_chat(messages: list[dict[str, Any]]) -> str:
    """For checkpoints without a chat template: one 'role: content' line per message."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def completion_prompts(
    tokenizer: Any, request: Any, vocab_size: int
) -> list[list[int]]:
    """One token list per prompt in the request (a string, ids, or a list of either)."""
    prompt = request.prompt
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]  # type: ignore[list-item]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts:
        raise invalid("The prompt must not be empty.", "prompt")
    token_lists = []
    for p in prompts:
        ids = list(tokenizer.encode(p)) if isinstance(p, str) else list(p)
        if not ids:
            raise invalid("The prompt must not be empty.", "prompt")
        if any(not 0 <= t < vocab_size for t in ids):
            raise invalid(f"Prompt token ids must be in [0, {vocab_size}).", "prompt")
        token_lists.append(ids)
    return token_lists

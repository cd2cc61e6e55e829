"""Requests -> prompt token ids (chat template or plain text)."""

from __future__ import annotations

from typing import Any

from .errors import invalid
from .prompt_tokens import PromptEncoder
from .protocol import ChatCompletionRequest, CompletionRequest
from .tool_messages import MessageError, template_messages

# Keys a client may not override through chat_template_kwargs: they change what the
# template call returns, not what the template renders.
_RESERVED_TEMPLATE_KWARGS = {
    "conversation", "messages", "tools", "tokenize", "return_dict", "return_tensors",
    "add_generation_prompt", "continue_final_message", "padding", "truncation",
    "max_length", "return_assistant_tokens_mask", "chat_template", "tokenizer_kwargs",
}


def chat_prompt(tokenizer: Any, encoder: PromptEncoder, request: ChatCompletionRequest
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


def _plain_chat(messages: list[dict[str, Any]]) -> str:
    """For checkpoints without a chat template: one 'role: content' line per message."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def completion_prompts(
    tokenizer: Any, request: CompletionRequest, vocab_size: int
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

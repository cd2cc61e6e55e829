"""An agent loop of 20 turns on /v1/messages and on /v1/responses reuses the prefix cache
exactly as the same loop on /v1/chat/completions does: the same prompts, the same cached
tokens reported on every turn (each route on its own fresh server, same model)."""

from __future__ import annotations

import anthropic
import openai
import pytest
from server_process import ServerProcess

TURNS = 20
SYSTEM = "You are a careful agent. Use short answers."


def _user(turn: int) -> str:
    return f"Step {turn}: what next?"


def _chat_loop(base: str) -> list[tuple[int, int]]:
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}]
    seen = []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": _user(turn)})
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=6,
                                               temperature=0)
        message = reply.choices[0].message
        answer = {"role": "assistant", "content": message.content or ""}
        if message.model_extra.get("reasoning_content"):
            answer["reasoning_content"] = message.model_extra["reasoning_content"]
        messages.append(answer)
        usage = reply.usage
        seen.append((usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens))
    return seen


def _messages_loop(base: str) -> list[tuple[int, int]]:
    client = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0)
    messages: list[dict] = []
    seen = []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": _user(turn)})
        reply = client.messages.create(model="m", system=SYSTEM, messages=messages,
                                       max_tokens=6, extra_body={"temperature": 0})
        messages.append({"role": "assistant",
                         "content": [block.model_dump() for block in reply.content]})
        usage = reply.usage
        seen.append((usage.input_tokens + usage.cache_read_input_tokens,
                     usage.cache_read_input_tokens))
    return seen


def _responses_loop(base: str) -> list[tuple[int, int]]:
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    previous = None
    seen = []
    for turn in range(TURNS):
        kwargs = {"previous_response_id": previous} if previous else {}
        reply = client.responses.create(model="m", instructions=SYSTEM, input=_user(turn),
                                        max_output_tokens=6, temperature=0, **kwargs)
        previous = reply.id
        usage = reply.usage
        seen.append((usage.input_tokens, usage.input_tokens_details.cached_tokens))
    return seen


@pytest.fixture(scope="module")
def chat_turns(tiny_checkpoint) -> list[tuple[int, int]]:
    with ServerProcess(tiny_checkpoint("qwen3", tokenizer="small"),
                       "--served-model-name", "m") as server:
        return _chat_loop(server.base_url)


@pytest.mark.parametrize("loop", [_messages_loop, _responses_loop])
def test_agent_loop_reuses_the_prefix_cache_as_chat_does(tiny_checkpoint, chat_turns,
                                                         loop) -> None:
    with ServerProcess(tiny_checkpoint("qwen3", tokenizer="small"),
                       "--served-model-name", "m") as server:
        turns = loop(server.base_url)
    assert turns == chat_turns
    # Every later turn starts from the cached conversation: at least all of the last
    # turn's prompt.
    for (before, _), (_, cached) in zip(turns, turns[1:], strict=False):
        assert cached >= before

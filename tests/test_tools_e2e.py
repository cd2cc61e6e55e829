"""Tool calls end to end: trained tiny models behind the real server, driven by the openai SDK.

Two models learn one exact tool call through their chat template (tests/tool_model.py):
Qwen3-style JSON calls with a reasoning block the model opens, and Qwen3.5-style XML calls
with the reasoning block opened by the template. For each: the non-streamed call, the
streamed one (accumulated by the SDK, and checked delta by delta), the follow-up turn with
the tool's result, tool_choice none / required / named. (test_tools_e2e_random.py: the
same server with random weights, where only the constraints make the answers valid.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from server_process import ServerProcess
from tool_model import (
    ANSWER,
    CALL_ARGUMENTS,
    FOLLOW_UP_REASONING,
    REASONING,
    WEATHER_TOOL,
    XML_TEMPLATE,
    ToolModel,
    cached_tool_model,
    first_turn,
    follow_up,
)

STYLES = ("hermes", "xml")


@pytest.fixture(scope="module", params=STYLES)
def served(request: pytest.FixtureRequest) -> Iterator[tuple[ToolModel, openai.OpenAI]]:
    style = request.param
    template = XML_TEMPLATE if style == "xml" else None
    model = cached_tool_model(style, template)
    with ServerProcess(model.path, "--served-model-name", "tool-model") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused",
                               max_retries=0, timeout=120)
        yield model, client


def _ask(client: openai.OpenAI, messages: list[dict], **kwargs: object):
    return client.chat.completions.create(model="tool-model", messages=messages,
                                          tools=[WEATHER_TOOL], temperature=0, max_tokens=120,
                                          **kwargs)


def test_non_streamed_call(served: tuple[ToolModel, openai.OpenAI]) -> None:
    _, client = served
    choice = _ask(client, first_turn()).choices[0]
    assert choice.finish_reason == "tool_calls"
    message = choice.message
    assert message.content is None
    assert message.model_extra.get("reasoning_content") == REASONING
    [call] = message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == CALL_ARGUMENTS


def test_streamed_call_equals_non_streamed(served: tuple[ToolModel, openai.OpenAI]) -> None:
    _, client = served
    whole = _ask(client, first_turn()).choices[0].message
    chunks = list(_ask(client, first_turn(), stream=True))
    fragments = [tc for c in chunks for ch in c.choices for tc in ch.delta.tool_calls or []]
    # OpenAI's shape: the first fragment of a call names it, the rest only add arguments.
    assert fragments[0].index == 0 and fragments[0].id.startswith("call_")
    assert fragments[0].type == "function" and fragments[0].function.name == "get_weather"
    for later in fragments[1:]:
        assert later.index == 0 and later.id is None and later.type is None
        assert later.function.name is None and later.function.arguments
    contents = [ch.delta.content for c in chunks for ch in c.choices if ch.delta.content]
    assert contents == []  # no tags, no whitespace around the call
    reasoning = "".join(ch.delta.model_extra.get("reasoning_content") or ""
                        for c in chunks for ch in c.choices)
    assert reasoning == REASONING
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] \
        == ["tool_calls"]
    # Accumulated the way the SDK does it: the same call as the non-streamed response.
    with client.chat.completions.stream(model="tool-model", messages=first_turn(),
                                        tools=[WEATHER_TOOL], temperature=0,
                                        max_tokens=120) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    [streamed] = final.message.tool_calls
    [expected] = whole.tool_calls
    assert streamed.function.name == expected.function.name
    assert streamed.function.arguments == expected.function.arguments
    assert streamed.function.parsed_arguments == CALL_ARGUMENTS


def test_follow_up_turn_with_the_tool_result(served: tuple[ToolModel, openai.OpenAI]) -> None:
    model, client = served
    [call] = _ask(client, first_turn()).choices[0].message.tool_calls
    choice = _ask(client, follow_up(call.id)).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == ANSWER
    assert not choice.message.tool_calls
    reasoning = choice.message.model_extra.get("reasoning_content")
    assert reasoning == (FOLLOW_UP_REASONING if model.style == "xml" else None)


def test_tool_choice_none_makes_no_call(served: tuple[ToolModel, openai.OpenAI]) -> None:
    _, client = served
    choice = _ask(client, first_turn(), tool_choice="none").choices[0]
    assert not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")
    assert "<tool_call>" not in (choice.message.content or "")


@pytest.mark.parametrize("tool_choice", ["required",
                                         {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_call_matches_the_models_own(served: tuple[ToolModel, openai.OpenAI],
                                            tool_choice: object) -> None:
    # The grammar writes the model's own format: forcing changes nothing it would have said.
    _, client = served
    free = _ask(client, first_turn()).choices[0].message.tool_calls[0]
    choice = _ask(client, first_turn(), tool_choice=tool_choice,
                  parallel_tool_calls=False).choices[0]
    assert choice.finish_reason == "tool_calls"
    [forced] = choice.message.tool_calls
    assert (forced.function.name, forced.function.arguments) == \
        (free.function.name, free.function.arguments)

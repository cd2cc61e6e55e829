"""The one internal chat request every API adapter builds (and its message models).

OpenAI's chat completions body is the richest of the wire formats, so the internal request
has its shape: the OpenAI chat adapter validates straight into it, the Anthropic Messages
and OpenAI Responses adapters translate their bodies into it. Everything after (prompt,
tools, constraints, sampling, the engine) reads only this.

Validation is strict ("0.5" is not a number, 1 is not a bool), unknown fields are ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..api.errors import invalid


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(StrictModel):
    type: str
    text: str | None = None


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class StreamOptions(StrictModel):
    include_usage: bool | None = None


class Generation(StrictModel):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    # OpenAI takes any int64 (-1 included); the sampler folds it into its 64-bit key.
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    logit_bias: dict[str, float] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise invalid("At most 16 stop sequences are allowed.", "stop")
        if any(s == "" for s in stops):
            raise invalid("Stop sequences must not be empty.", "stop")
        return tuple(stops)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Set by adapters whose API treats max_tokens as a cap, not a promise (Anthropic:
    # Claude Code asks for 32k whatever the context holds); never read from a body.
    _max_tokens_is_cap: bool = PrivateAttr(default=False)

    @property
    def max_tokens_is_cap(self) -> bool:
        return self._max_tokens_is_cap

    def with_max_tokens_as_cap(self) -> ChatRequest:
        self._max_tokens_is_cap = True
        return self

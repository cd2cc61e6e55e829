"""Validated requests -> SequenceSpecs: the checks that need the model (context, vocab)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..api.errors import invalid, unsupported
from ..engine.generation import SamplingParams, SequenceSpec
from .request import ChatRequest, Generation

_Request = Generation


@dataclass(frozen=True)
class Limits:
    context_length: int | None
    vocab_size: int
    max_tokens_default: int
    max_n: int
    sampling_defaults: dict[str, float] = field(default_factory=dict)


def check_chat_options(request: ChatRequest) -> None:
    """Options we cannot honour are refused (400), never silently ignored."""
    if request.top_logprobs is not None and not request.logprobs:
        raise invalid("top_logprobs requires logprobs to be true.", "top_logprobs")


def check_completion_options(request: Any) -> None:
    if request.echo:
        raise unsupported("echo", "echo")
    if request.suffix:
        raise unsupported("suffix", "suffix")
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise unsupported("best_of", "best_of different from n")


# OpenAI's defaults, used when neither the request nor the model's generation_config says.
_OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                    "repetition_penalty": 1.0}


def sampling_params(request: _Request, limits: Limits) -> SamplingParams:
    def pick(name: str) -> float:
        value = getattr(request, name)
        if value is None:
            value = limits.sampling_defaults.get(name, _OPENAI_DEFAULTS[name])
        return value

    return SamplingParams(
        temperature=float(pick("temperature")),
        top_p=float(pick("top_p")),
        top_k=max(int(pick("top_k")), 0),
        min_p=float(pick("min_p")),
        # Any int64 (OpenAI's -1 included) as the sampler's unsigned 64-bit key.
        seed=None if request.seed is None else request.seed % 2**64,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=float(pick("repetition_penalty")),
        logit_bias=_logit_bias(request.logit_bias, limits.vocab_size),
    )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    out = []
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            message = f"logit_bias keys must be token ids, got '{key}'."
            raise invalid(message, "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise invalid(f"logit_bias token {token} is outside [0, {vocab_size}).", "logit_bias")
        if not -100 <= value <= 100:
            raise invalid("logit_bias values must be in [-100, 100].", "logit_bias")
        out.append((token, float(value)))
    return tuple(sorted(out))


def max_new_tokens(request: _Request, prompt_len: int, limits: Limits) -> int:
    explicit = getattr(request, "max_completion_tokens", None) or request.max_tokens
    param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) \
        else "max_tokens"
    room = None if limits.context_length is None else limits.context_length - prompt_len
    if room is not None and room <= 0:
        raise invalid(
            f"This model's maximum context length is {limits.context_length} tokens; "
            f"the prompt has {prompt_len}.",
            "messages" if isinstance(request, ChatRequest) else "prompt",
            "context_length_exceeded",
        )
    if explicit is None:
        return limits.max_tokens_default if room is None else min(limits.max_tokens_default, room)
    if room is not None and explicit > room:
        if getattr(request, "max_tokens_is_cap", False):
            return room
        raise invalid(
            f"{param} is too large: {explicit}. This model's maximum context length is "
            f"{limits.context_length} tokens and the prompt has {prompt_len}, so at most "
            f"{room} can be generated.",
            param,
            "context_length_exceeded",
        )
    return explicit


def build_specs(
    request: _Request, prompts: list[list[int]], logprobs: int | None, limits: Limits,
    processors: Callable[[], list[Any]] | None = None, chat_turn: bool = False,
) -> list[SequenceSpec]:
    """n choices per prompt; choice index = prompt index * n + j, as in OpenAI's API."""
    n = request.n or 1
    if n > limits.max_n:
        raise invalid(f"n must be at most {limits.max_n}.", "n")
    sampling = sampling_params(request, limits)
    stop = request.stop_strings()
    specs = []
    for p, prompt in enumerate(prompts):
        max_tokens = max_new_tokens(request, len(prompt), limits)
        for j in range(n):
            specs.append(SequenceSpec(prompt, max_tokens, sampling, stop, logprobs, p * n + j,
                                      processors, chat_turn))
    return specs

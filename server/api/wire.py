"""What every wire format shares: strict body parsing with 400s that name the parameter,
response models that put on the wire exactly the keys the code set, and usage counts."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import APIError, invalid

RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_request(model: type[RequestT], body: bytes) -> RequestT:
    """Validate a JSON body, turning the first problem into a 400 naming the parameter."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def _param_path(loc: tuple[Any, ...]) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'; drops pydantic's union tags."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and _FIELD_NAME.match(part) and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path or None


def _validation_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {first['msg']}.",
                        code="invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "The request body must be a JSON object.", code="invalid_json")
    param = _param_path(first["loc"])
    if first["type"] == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param,
                       "missing_required_parameter")
    kind = "invalid_type" if first["type"].endswith("_type") else "invalid_value"
    return invalid(f"Invalid value for '{param}': {first['msg']}.", param, kind)


class WireModel(BaseModel):
    """A response model: dumped with exclude_unset, so a key is on the wire exactly when
    the code set it (deltas carry only what changed)."""

    model_config = ConfigDict(extra="forbid")
    # Fields sent even when left at their default (`object`, `role`, ...).
    _always: ClassVar[tuple[str, ...]] = ()

    def model_post_init(self, _context: Any) -> None:
        self.__pydantic_fields_set__.update(self._always)

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


def dumps(payload: Any) -> str:
    """One line of JSON, as SSE data lines carry it."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


class PromptTokensDetails(WireModel):
    cached_tokens: int = 0


class Usage(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


class TextChunks:
    """The hot path of streaming: a chunk that only carries text. Its JSON is rendered once
    per choice through the response models, around a marker, and reused with the text
    spliced in (pydantic per token costs more CPU than the engine spends per token)."""

    _MARKER = "\x00swan-text\x00"

    def __init__(self, render: Callable[[int, str], str]):
        self._render = render
        self._parts: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        parts = self._parts.get(index)
        if parts is None:
            marker = json.dumps(self._MARKER, ensure_ascii=False)
            head, _, tail = self._render(index, self._MARKER).partition(marker)
            parts = self._parts[index] = (head, tail)
        return parts[0] + json.dumps(text, ensure_ascii=False) + parts[1]

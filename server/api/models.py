"""The server's own endpoints: models, tokenize / detokenize (vLLM and llama.cpp shapes),
health and metrics."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..chat.prompts import chat_prompt
from ..chat.request import ChatMessage, ChatRequest, StrictModel
from ..engine.engine import EngineState
from ..metrics import PROMETHEUS_CONTENT_TYPE
from .errors import invalid
from .serving import check_model, context, off_loop, read_body, require_ready
from .wire import WireModel, parse_request


class ModelCard(WireModel):
    _always = ("object", "owned_by")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "swan-serve"


class ModelList(WireModel):
    _always = ("object",)
    object: Literal["list"] = "list"
    data: list[ModelCard]


async def list_models(request: Request) -> Response:
    ctx = context(request)
    cards = [ModelCard(id=name, created=ctx.started) for name in ctx.settings.served_model_names]
    return JSONResponse(ModelList(data=cards).wire())


async def retrieve_model(request: Request) -> Response:
    ctx = context(request)
    name = request.path_params["model"]
    check_model(ctx, name)
    return JSONResponse(ModelCard(id=name, created=ctx.started).wire())


class TokenizeRequest(StrictModel):
    """vLLM's body (`prompt` or `messages`) or llama.cpp's (`content`)."""

    model: str | None = None
    prompt: str | None = None
    content: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        given = [x for x in (self.prompt, self.content, self.messages) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'prompt', 'content' or 'messages'")
        return self


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]


async def tokenize(request: Request) -> Response:
    ctx = context(request)
    req = parse_request(TokenizeRequest, await read_body(request, ctx.settings.max_body_bytes))
    if req.model is not None:
        check_model(ctx, req.model)
    require_ready(ctx.engine)
    tokens = await off_loop(ctx, _tokenize, ctx, req)
    return JSONResponse({"tokens": tokens, "count": len(tokens),
                         "max_model_len": ctx.engine.context_length})


def _tokenize(ctx: Any, req: TokenizeRequest) -> list[int]:
    if req.messages is not None:
        chat = ChatRequest(model=ctx.settings.model_id, messages=req.messages, tools=req.tools,
                           chat_template_kwargs=req.chat_template_kwargs)
        return chat_prompt(ctx.engine.tokenizer, ctx.engine.prompt_encoder, chat)
    text = req.prompt if req.prompt is not None else req.content
    return list(ctx.engine.tokenizer.encode(text, add_special_tokens=req.add_special_tokens))


async def detokenize(request: Request) -> Response:
    ctx = context(request)
    req = parse_request(DetokenizeRequest, await read_body(request, ctx.settings.max_body_bytes))
    if req.model is not None:
        check_model(ctx, req.model)
    require_ready(ctx.engine)
    vocab = ctx.engine.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise invalid(f"Token ids must be in [0, {vocab}).", "tokens")
    text = await off_loop(ctx, ctx.engine.tokenizer.decode, req.tokens)
    # vLLM answers `prompt`, llama.cpp `content`: both, so either client reads it.
    return JSONResponse({"prompt": text, "content": text})


async def health(request: Request) -> Response:
    engine = context(request).engine
    if engine.state is EngineState.READY:
        body: dict = {"status": "ok"}
        if engine.distributed is not None:
            body["distributed"] = engine.distributed.describe()
        return JSONResponse(body)
    if engine.state is EngineState.LOADING:
        body = {"status": "loading", "phase": engine.loading_phase,
                "progress": round(engine.loading_progress, 4)}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "error", "message": engine.failure or "stopped"},
                        status_code=503)


async def metrics(request: Request) -> Response:
    engine = context(request).engine
    text = engine.metrics.render()
    if engine.distributed is not None:
        text += engine.distributed.prometheus()
    return PlainTextResponse(text, headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


__all__ = ["detokenize", "health", "list_models", "metrics", "retrieve_model",
           "tokenize"]

"""The Starlette application: routes, middleware, error handlers, engine lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .api import anthropic_messages, models, openai_chat, openai_completions, openai_responses
from .api.errors import APIError, error_body
from .api.middleware import ApiKeyMiddleware, RequestContextMiddleware
from .api.serving import ServerContext, stop_streams
from .engine.engine import Engine, ModelProvider
from .settings import ServerSettings

if TYPE_CHECKING:
    from .engine.group import Distributed


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response(request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "Not found.", 405: "Method not allowed."}
    message = messages.get(exc.status_code, str(exc.detail))
    return JSONResponse(error_body(exc.status_code, message, path=request.url.path),
                        status_code=exc.status_code, headers=exc.headers)


def create_app(
    settings: ServerSettings,
    on_engine_failure: Callable[[str], None] | None = None,
    model_provider: ModelProvider | None = None,
    distributed: Distributed | None = None,
) -> Starlette:
    engine = Engine(settings, model_provider, distributed)
    context = ServerContext(
        settings=settings,
        engine=engine,
        tokenizer_pool=ThreadPoolExecutor(1, thread_name_prefix="swan-tokenize"),
        started=int(time.time()),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # The model loads on the generation thread while we already answer /health (503).
        engine.start(on_failure=on_engine_failure)
        yield
        stop_streams(context)
        engine.stop()
        context.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    middleware = [Middleware(RequestContextMiddleware, metrics=engine.metrics)]
    if settings.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "x-api-key",
                           "anthropic-version", "anthropic-beta"],
            expose_headers=["X-Request-ID"],
        ))
    if settings.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=settings.api_key))

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", openai_chat.chat_completions, methods=["POST"]),
            Route("/v1/completions", openai_completions.completions, methods=["POST"]),
            Route("/v1/responses", openai_responses.create_response, methods=["POST"]),
            Route("/v1/responses/{response_id}", openai_responses.retrieve_response,
                  methods=["GET"]),
            Route("/v1/messages", anthropic_messages.create_message, methods=["POST"]),
            Route("/v1/messages/count_tokens", anthropic_messages.count_tokens,
                  methods=["POST"]),
            Route("/v1/models", models.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", models.retrieve_model, methods=["GET"]),
            Route("/tokenize", models.tokenize, methods=["POST"]),
            Route("/detokenize", models.detokenize, methods=["POST"]),
            Route("/health", models.health, methods=["GET"]),
            Route("/metrics", models.metrics, methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={APIError: _api_error, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.context = context
    return app


class Server(uvicorn.Server):
    """uvicorn's server, which on SIGINT / SIGTERM first ends every open stream with an error
    event in its API's shape (rather than cutting it when the graceful period runs out)."""

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.app
        loop = getattr(self, "_loop", None)
        if loop is not None and isinstance(app, Starlette):
            loop.call_soon_threadsafe(stop_streams, app.state.context)
        super().handle_exit(sig, frame)

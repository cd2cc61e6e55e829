"""Pure-ASGI middleware (safe around streaming responses): request ids, metrics, last-resort
error handling, and the API key check on /v1 routes."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..metrics import ServerMetrics
from .errors import APIError, error_body

log = logging.getLogger("swan_serve.http")

_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
           "/v1/messages/count_tokens", "/v1/models", "/tokenize", "/detokenize", "/health",
           "/metrics"}
# Outside /v1 but behind the API key too: they use the model's tokenizer.
_KEYED_PATHS = {"/tokenize", "/detokenize"}
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    """Gives each request an id (echoed as X-Request-ID), counts it by route and status, and
    turns any unexpected exception into a JSON 500 without a stack trace."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _CLIENT_REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["received"] = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if not started:
                body = error_body(500, "The server had an internal error.", code="internal_error",
                                  path=scope["path"])
                await _send_json(send_with_id, 500, body)
        finally:
            route = scope["path"] if scope["path"] in _ROUTES else "other"
            self.metrics.count_request(route, status)


class ApiKeyMiddleware:
    """API key check on every /v1 route: `Authorization: Bearer KEY` (OpenAI clients) or
    `x-api-key: KEY` (Anthropic clients). CORS preflights pass: they carry no key."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and (scope["path"].startswith("/v1") or scope["path"] in _KEYED_PATHS)
            and scope["method"] != "OPTIONS"
            and not self._authorized(Headers(scope=scope))
        ):
            error = APIError(401, "Invalid or missing API key (send 'Authorization: Bearer KEY' "
                             "or 'x-api-key: KEY').", code="invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
            await error.response(scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._key):
            return True
        given = headers.get("x-api-key")
        return given is not None and hmac.compare_digest(given.strip().encode(), self._key)


async def _send_json(send: Send, status: int, body: dict) -> None:
    import json

    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode())],
    })
    await send({"type": "http.response.body", "body": payload})

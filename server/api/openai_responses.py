"""OpenAI Responses: POST /v1/responses, GET /v1/responses/{id} (placeholder)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from .errors import APIError


async def create_response(request: Request) -> Response:
    raise APIError(404, "Not yet.")


async def retrieve_response(request: Request) -> Response:
    raise APIError(404, "Not yet.")

"""Errors in each API's own shape.

OpenAI routes: {"error": {"message", "type", "param", "code"}}; Anthropic's /v1/messages:
{"type": "error", "error": {"type", "message"}}. Code raises one APIError; where it is
written out, the request's path picks the shape.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

# OpenAI's error `type` per HTTP status family.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error meant for the client: its message is safe to show."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self, path: str = "") -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code,
                          path=path)

    def response(self, path: str = "") -> JSONResponse:
        return JSONResponse(self.body(path), status_code=self.status, headers=self.headers)


# Anthropic's error `type` per HTTP status.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None,
    path: str = "",
) -> dict:
    if is_anthropic(path):
        return anthropic_error(status, message)
    error_type = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "api_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """A 400 naming the offending parameter."""
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, what: str) -> APIError:
    return APIError(
        400, f"{what} is not supported by this server.", param=param, code="unsupported_parameter"
    )


def anthropic_error(status: int, message: str) -> dict:
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500
                                else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}

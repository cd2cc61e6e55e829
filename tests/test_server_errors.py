"""Malformed and hostile input over raw HTTP against the real server: always a 4xx with the
OpenAI error shape, never a stack trace, and the server stays healthy. Also the API key,
CORS, body limit, context checks and backpressure (429)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_process import ServerProcess, eos_token_ids

MODEL = "tiny"
KEY = "test-secret-key"
ORIGIN = "http://allowed.example"


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen3", tokenizer="small")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(model_dir, "--served-model-name", MODEL, "--api-key", KEY,
                       "--max-concurrency", "2", "--max-queue", "1", "--max-body-mb", "1",
                       "--max-model-len", "512", "--cors-origin", ORIGIN) as running:
        yield running


def post(server: ServerProcess, body: bytes | dict, path: str = "/v1/chat/completions",
         headers: dict[str, str] | None = None) -> tuple[int, dict, dict[str, str]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", path, raw, {"Content-Type": "application/json",
                                     "Authorization": f"Bearer {KEY}", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data), {k.lower(): v for k, v in response.getheaders()}


def request(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            **fields}


def assert_error(status: int, body: dict, expected: int, param: str | None = None) -> dict:
    assert status == expected, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_api_key_required_on_v1_routes(server: ServerProcess) -> None:
    status, body, headers = post(server, request(), headers={"Authorization": ""})
    error = assert_error(status, body, 401)
    assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    status, body, _ = post(server, request(), headers={"Authorization": "Bearer wrong"})
    assert_error(status, body, 401)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().status == 401
    # Health and metrics stay open for probes and scrapers.
    assert server.health()[0] == 200


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        (request(temperature="hot"), "temperature", "invalid_type"),
        (request(temperature=3.5), "temperature", "invalid_value"),
        (request(top_p=0), "top_p", "invalid_value"),
        (request(max_tokens=-1), "max_tokens", "invalid_value"),
        (request(max_tokens=2.5), "max_tokens", "invalid_type"),
        (request(n=0), "n", "invalid_value"),
        (request(stream="yes"), "stream", "invalid_type"),
        (request(stop=[1, 2]), "stop", "invalid_type"),
        (request(logprobs=True, top_logprobs=50), "top_logprobs", "invalid_value"),
        (request(messages=[]), "messages", "invalid_value"),
        (request(messages="Hi"), "messages", "invalid_type"),
        (request(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", None),
        (request(messages=[{"role": "user"}]), "messages[0].content", None),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "model", "missing_required_parameter"),
        (request(logit_bias={"abc": 1}), "logit_bias", None),
        (request(logit_bias={"5": 500}), "logit_bias", None),
        (request(logit_bias={"99999999": 1}), "logit_bias", None),
        (request(max_tokens=10**9), "max_tokens", "context_length_exceeded"),
        (request(stop=[""]), "stop", None),
        (request(response_format={"type": "json_schema"}), "response_format.json_schema", None),
        (request(tool_choice="required"), "tool_choice", "invalid_value"),  # no tools given
        (request(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
         "messages[0].content[0].type", "unsupported_parameter"),
        (request(chat_template_kwargs={"tokenize": False}), "chat_template_kwargs", None),
    ],
)
def test_bad_requests_get_400_naming_the_parameter(
    server: ServerProcess, body: bytes | dict, param: str | None, code: str | None
) -> None:
    status, payload, _ = post(server, body)
    error = assert_error(status, payload, 400, param)
    if code is not None:
        assert error["code"] == code
    assert error["type"] == "invalid_request_error"


def test_completions_validation(server: ServerProcess) -> None:
    status, body, _ = post(server, {"model": MODEL, "prompt": [], "max_tokens": 2},
                           path="/v1/completions")
    assert_error(status, body, 400, "prompt")
    status, body, _ = post(server, {"model": MODEL, "prompt": [5, 10**7]},
                           path="/v1/completions")
    assert_error(status, body, 400, "prompt")
    status, body, _ = post(server, {"model": MODEL, "prompt": "x", "echo": True},
                           path="/v1/completions")
    assert_error(status, body, 400, "echo")


def test_unknown_fields_are_ignored(server: ServerProcess) -> None:
    status, body, _ = post(server, request(frobnicate=True, user="u-1", metadata={"a": "b"}))
    assert status == 200, body
    assert body["choices"][0]["message"]["role"] == "assistant"


def test_model_names_never_load_anything(server: ServerProcess, model_dir: Path) -> None:
    for name in ("other-model", str(model_dir), "/etc", "Qwen/Qwen3-8B"):
        status, body, _ = post(server, request(model=name))
        error = assert_error(status, body, 404, "model")
        assert error["code"] == "model_not_found"


def test_prompt_longer_than_context(server: ServerProcess) -> None:
    status, body, _ = post(server, request(messages=[{"role": "user",
                                                      "content": "word " * 2000}]))
    error = assert_error(status, body, 400, "messages")
    assert error["code"] == "context_length_exceeded"


def test_body_over_the_limit_is_refused(server: ServerProcess) -> None:
    huge = json.dumps(request(messages=[{"role": "user", "content": "x" * (10 * 1024 * 1024)}]))
    status, body, _ = post(server, huge.encode())
    assert_error(status, body, 413)


def test_unknown_route_and_method(server: ServerProcess) -> None:
    status, body, _ = post(server, request(), path="/v1/nothing-here")
    assert_error(status, body, 404)
    status, body, _ = post(server, request(), path="/v1/models")
    assert_error(status, body, 405)


def test_cors_only_for_the_configured_origin(server: ServerProcess) -> None:
    def preflight(origin: str) -> dict[str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        response = conn.getresponse()
        response.read()
        return {k.lower(): v for k, v in response.getheaders()}

    assert preflight(ORIGIN)["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in preflight("http://evil.example")


def test_request_id_is_echoed(server: ServerProcess) -> None:
    _, _, headers = post(server, request(), headers={"X-Request-ID": "abc-123"})
    assert headers["x-request-id"] == "abc-123"
    _, _, headers = post(server, request())
    assert len(headers["x-request-id"]) == 32


def test_backpressure_429_then_recovers(server: ServerProcess, model_dir: Path) -> None:
    """2 running + 1 queued sequences fill this server; the next request gets 429."""
    no_eos = {str(t): -100 for t in eos_token_ids(model_dir)}
    long_stream = request(max_tokens=400, stream=True, logit_bias=no_eos)
    streams = []
    try:
        for _ in range(3):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            streams.append(conn)
            conn.request("POST", "/v1/chat/completions", json.dumps(long_stream),
                         {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            response = conn.getresponse()
            assert response.status == 200
            response.readline()  # the stream has started
        status, body, headers = post(server, request())
        error = assert_error(status, body, 429)
        assert error["type"] == "rate_limit_error"
        assert int(headers["retry-after"]) >= 1
    finally:
        for conn in streams:
            conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.metrics()["swan_active_sequences"] > 0:
        time.sleep(0.05)
    status, body, _ = post(server, request())
    assert status == 200, body


def test_still_healthy_after_all_that(server: ServerProcess) -> None:
    assert server.health() == (200, {"status": "ok"})
    status, body, _ = post(server, request(max_tokens=3))
    assert status == 200
    assert body["usage"]["completion_tokens"] <= 3
    assert "Traceback" not in server.log()

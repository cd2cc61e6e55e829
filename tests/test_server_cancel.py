"""Clients that hang up free their sequences at once: 20 streaming clients dropping
mid-generation, and a non-streaming client dropping while it waits."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_process import ServerProcess, eos_token_ids

MODEL = "tiny"
# Long enough that, uncancelled, the sequences would still be decoding for many seconds.
MAX_TOKENS = 4000


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen3", tokenizer="small")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(model_dir, "--served-model-name", MODEL, "--max-concurrency", "32",
                       "--max-tokens-default", str(MAX_TOKENS)) as running:
        yield running


@pytest.fixture(scope="module")
def long_request(model_dir: Path) -> dict:
    return {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0.7,
            "messages": [{"role": "user", "content": "Write a very long story."}],
            "logit_bias": {str(t): -100 for t in eos_token_ids(model_dir)}}


GENERATED_TEXT = re.compile(rb'"content":"[^"]')
CANCELLED = 'swan_sequences_finished_total{reason="cancelled"}'


def test_twenty_streaming_clients_disconnect(server: ServerProcess, long_request: dict) -> None:
    cancelled_before = server.metrics().get(CANCELLED, 0.0)
    clients = []
    try:
        for _ in range(20):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            clients.append(conn)
            conn.request("POST", "/v1/chat/completions",
                         json.dumps({**long_request, "stream": True}),
                         {"Content-Type": "application/json"})
        for conn in clients:
            response = conn.getresponse()
            assert response.status == 200
            while not GENERATED_TEXT.search(response.readline()):
                pass  # read until the first generated text arrives
        # All twenty are decoding together.
        assert server.metrics()["swan_active_sequences"] == 20
    finally:
        for conn in clients:
            if conn.sock is not None:
                conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
    dropped_at = time.monotonic()
    active = server.wait_for_metric("swan_active_sequences", lambda v: v == 0, timeout=5)
    assert active == 0
    assert time.monotonic() - dropped_at < 5
    assert server.metrics()[CANCELLED] == cancelled_before + 20
    # Nothing ran to max_tokens.
    assert server.metrics().get('swan_sequences_finished_total{reason="length"}', 0) == 0


def test_non_streaming_client_disconnects(server: ServerProcess, long_request: dict) -> None:
    cancelled_before = server.metrics().get(CANCELLED, 0.0)
    body = json.dumps(long_request).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert server.wait_for_metric("swan_active_sequences", lambda v: v == 1, timeout=10) == 1
    time.sleep(0.2)  # well into decoding
    sock.close()
    assert server.wait_for_metric("swan_active_sequences", lambda v: v == 0, timeout=5) == 0
    assert server.metrics()[CANCELLED] == cancelled_before + 1


def test_server_serves_normally_afterwards(server: ServerProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions",
                 json.dumps({"model": MODEL, "max_tokens": 4,
                             "messages": [{"role": "user", "content": "Hi"}]}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert json.loads(response.read())["usage"]["completion_tokens"] <= 4
    assert server.metrics()["swan_active_sequences"] == 0

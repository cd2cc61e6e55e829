"""1,000 malformed bodies spread over every POST endpoint of the real server: each gets an
answer below 500 (a clear 4xx, or a normal answer when the mutation left it valid), and
the server is healthy afterwards."""

from __future__ import annotations

import copy
import json
import random
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from server_process import ServerProcess

BODIES = 1000
MESSAGES = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}}}}
VALID = {
    "/v1/chat/completions": {"model": "m", "messages": MESSAGES, "max_tokens": 2,
                             "tools": [TOOL], "stream": False},
    "/v1/completions": {"model": "m", "prompt": "Hi", "max_tokens": 2},
    "/v1/responses": {"model": "m", "input": [{"role": "user", "content": "Hi"}],
                      "max_output_tokens": 2, "tools": [{"type": "function", "name": "f",
                                                         "parameters": {"type": "object"}}]},
    "/v1/messages": {"model": "m", "max_tokens": 2, "system": "s",
                     "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                     "tools": [{"name": "f", "input_schema": {"type": "object"}}]},
    "/v1/messages/count_tokens": {"model": "m", "messages": MESSAGES},
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [1, 2]},
}
ODD_VALUES = [None, True, -1, 0, 2**70, -(2**70), 1e308, -0.5, "", "x", "\u0000\udbff" * 3,
              "a" * 5000, [], [None], [[]], {}, {"type": None}, {"role": "tool"},
              [{"type": "image", "source": {}}], {"type": "function", "function": {}},
              [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{"}}]}],
              {"$ref": "#/nope"}, {"type": "objekt"}, "auto", "none", "required", "any"]


def _mutate(body: object, rng: random.Random) -> object:
    """Changes one place in the tree: a value replaced, a key dropped or added."""
    if isinstance(body, dict) and body and rng.random() < 0.7:
        key = rng.choice(sorted(body))
        roll = rng.random()
        if roll < 0.2:
            del body[key]
        elif roll < 0.5 and isinstance(body[key], dict | list):
            body[key] = _mutate(body[key], rng)
        else:
            body[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        return body
    if isinstance(body, list) and body and rng.random() < 0.7:
        i = rng.randrange(len(body))
        body[i] = _mutate(body[i], rng) if rng.random() < 0.5 else rng.choice(ODD_VALUES)
        return body
    if isinstance(body, dict):
        body[rng.choice(["tool_choice", "stop", "n", "seed", "thinking", "text",
                         "response_format", "logit_bias", "previous_response_id"])] = \
            copy.deepcopy(rng.choice(ODD_VALUES))
    return body


def _malformed(rng: random.Random) -> tuple[str, bytes, str]:
    path = rng.choice(sorted(VALID))
    roll = rng.random()
    content_type = "application/json"
    if roll < 0.1:  # not JSON, or not an object
        raw = rng.choice([b"", b"{", b"[1, 2]", b"null", b"\xff\xfe", b'{"model": "m",}',
                          json.dumps(VALID[path]).encode()[: rng.randrange(1, 40)]])
    elif roll < 0.15:
        raw, content_type = json.dumps(VALID[path]).encode(), "text/plain"
    else:
        body = copy.deepcopy(VALID[path])
        for _ in range(rng.randint(1, 3)):
            body = _mutate(body, rng)
        raw = json.dumps(body).encode()
    return path, raw, content_type


def _post(base: str, case: tuple[str, bytes, str]) -> tuple[str, int, bytes]:
    path, raw, content_type = case
    request = urllib.request.Request(base + path, raw, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return path, response.status, response.read()
    except urllib.error.HTTPError as exc:
        return path, exc.code, exc.read()


def test_malformed_bodies_get_4xx_not_5xx(tiny_checkpoint) -> None:
    model = tiny_checkpoint("qwen3", tokenizer="small")
    rng = random.Random(15)
    cases = [_malformed(rng) for _ in range(BODIES)]
    with ServerProcess(model, "--served-model-name", "m", "--max-tokens", "2") as server:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda case: _post(server.base_url, case), cases))
        failures = [(path, status, body[:300], raw[:300])
                    for (path, status, body), (_, raw, _) in zip(answers, cases, strict=True)
                    if status >= 500]
        assert failures == []
        assert server.health() == (200, {"status": "ok"})
        assert "Traceback" not in server.log()
    statuses = {status for _, status, _ in answers}
    assert {200, 400} <= statuses  # both valid and refused bodies were among them
    for path, status, body in answers:
        if status == 400:  # each refusal is JSON in its API's shape
            error = json.loads(body)
            assert error["type"] == "error" if path.startswith("/v1/messages") else \
                "message" in error["error"]

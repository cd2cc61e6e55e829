"""The flags users already type (vLLM, vMLX, mlx_lm.server) and the small endpoints their
clients call: GET /v1/models/{id}, POST /tokenize, POST /detokenize."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from server_process import SWAN_SERVE, ServerProcess, eos_token_ids

TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory) -> Iterator[tuple[ServerProcess, Path]]:
    model = tiny_checkpoint("qwen3", tokenizer="small")
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    with ServerProcess(None, "--model", str(model), "--served-model-name", "alpha", "beta",
                       "--max-tokens", "7", "--log-level", "WARNING", "--chat-template",
                       str(template), "--trust-remote-code", "--continuous-batching",
                       "--enable-prefix-cache", "--enable-auto-tool-choice",
                       "--tool-call-parser", "qwen3") as running:
        yield running, model


def test_names_models_and_default_max_tokens(server: tuple[ServerProcess, Path]) -> None:
    process, model = server
    client = openai.OpenAI(base_url=process.base_url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list()] == ["alpha", "beta"]
    assert client.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gamma")
    no_end = {str(t): -100 for t in eos_token_ids(model)}
    reply = client.chat.completions.create(model="beta", logit_bias=no_end,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert reply.usage.completion_tokens == 7 and reply.choices[0].finish_reason == "length"


def test_tokenize_detokenize_and_the_chat_template(server: tuple[ServerProcess, Path]) -> None:
    base = server[0].base_url
    status, body = _post(base + "/tokenize", {"prompt": "Hello world"})
    assert status == 200 and body["count"] == len(body["tokens"]) > 0
    status, back = _post(base + "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == back["content"] == "Hello world"
    _, llama = _post(base + "/tokenize", {"content": "Hello world"})
    assert llama["tokens"] == body["tokens"]
    # --chat-template replaced the model's template.
    _, chat = _post(base + "/tokenize", {"model": "alpha",
                                         "messages": [{"role": "user", "content": "Hi"}]})
    _, text = _post(base + "/detokenize", {"tokens": chat["tokens"]})
    assert text["prompt"] == "[user] Hi\n[assistant] "
    status, error = _post(base + "/detokenize", {"tokens": [10**9]})
    assert status == 400 and error["error"]["param"] == "tokens"
    status, error = _post(base + "/tokenize", {"prompt": "a", "content": "b"})
    assert status == 400


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SWAN_SERVE), *args], capture_output=True, text=True, timeout=60)


def test_version_and_no_abbreviations() -> None:
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("swan-serve ")
    abbreviated = _cli("--max-tokens-d", "5")
    assert abbreviated.returncode == 2 and "unrecognized arguments" in abbreviated.stderr
    twice = _cli("a/b", "--model", "c/d")
    assert twice.returncode == 2 and "MODEL given twice" in twice.stderr
    missing = _cli("--chat-template", "/nonexistent.jinja")
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("swan-serve: error: --chat-template")

"""Found when tried: a server stopped (SIGINT) mid-stream ends every open stream with an
error event in its API's shape; seed -1 and any int64 seed are accepted as OpenAI accepts
them; reasoning tokens, shown or not, are counted the same in usage, logprobs and
max_tokens."""

from __future__ import annotations

import json
import signal
import threading
import urllib.request

import openai
from server_process import ServerProcess
from tool_model import REASONING, WEATHER_TOOL, cached_tool_model, first_turn

BODIES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Go."}],
                             "stream": True, "max_tokens": 30000, "temperature": 0},
    "/v1/messages": {"messages": [{"role": "user", "content": "Go."}], "stream": True,
                     "max_tokens": 30000, "temperature": 0},
    "/v1/responses": {"input": "Go.", "stream": True, "max_output_tokens": 30000,
                      "temperature": 0},
}


def _read(base: str, path: str, started: threading.Barrier, out: dict[str, list[str]]) -> None:
    lines: list[str] = []
    out[path] = lines
    body = json.dumps({"model": "m", **BODIES[path]}).encode()
    request = urllib.request.Request(base + path, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        waiting = True
        for raw in response:
            line = raw.decode().rstrip("\r\n")
            lines.append(line)
            if waiting and ("delta" in line or "chat.completion.chunk" in line):
                waiting = False
                started.wait()


def test_shutdown_ends_every_stream_with_an_error_event(tiny_checkpoint) -> None:
    model = tiny_checkpoint("qwen3", tokenizer="small")
    server = ServerProcess(model, "--served-model-name", "m").start()
    try:
        started = threading.Barrier(len(BODIES) + 1, timeout=60)
        out: dict[str, list[str]] = {}
        readers = [threading.Thread(target=_read, args=(server.base_url, path, started, out))
                   for path in BODIES]
        for reader in readers:
            reader.start()
        started.wait()  # every stream is generating
        server.process.send_signal(signal.SIGINT)
        for reader in readers:
            reader.join(30)
        assert server.process.wait(30) in (0, 130)  # 130: the SIGINT, re-raised by uvicorn
    finally:
        server.stop()
    chat = [line for line in out["/v1/chat/completions"] if line.startswith("data: ")]
    assert chat[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(chat[-2][6:])["error"]["message"]
    messages = out["/v1/messages"]
    assert "event: error" in messages
    error = json.loads(messages[messages.index("event: error") + 1][6:])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    responses = out["/v1/responses"]
    assert "event: error" in responses
    error = json.loads(responses[responses.index("event: error") + 1][6:])
    assert error["type"] == "error" and "shutting down" in error["message"]


def test_any_int64_seed(tiny_checkpoint) -> None:
    model = tiny_checkpoint("qwen3", tokenizer="small")
    with ServerProcess(model, "--served-model-name", "m") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        texts = {}
        for seed in (-1, -(2**63), 2**63 - 1, 7):
            reply = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "Hi"}], seed=seed,
                max_tokens=4, temperature=1.0)
            texts[seed] = reply.choices[0].message.content
        again = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], seed=-1, max_tokens=4,
            temperature=1.0)
        assert again.choices[0].message.content == texts[-1]
        with openai.OpenAI(base_url=server.base_url + "/v1", api_key="x",
                           max_retries=0) as raw:
            try:
                raw.chat.completions.create(model="m", messages=[{"role": "user",
                                                                  "content": "Hi"}],
                                            seed=2**64, max_tokens=1)
            except openai.BadRequestError as exc:
                assert exc.body["param"] == "seed"
            else:
                raise AssertionError("a seed past 64 bits was accepted")


def test_reasoning_tokens_count_in_usage_and_logprobs() -> None:
    """The reasoning block is not content, but its tokens are generated: completion_tokens,
    logprobs and max_tokens all count them (also when an empty block shows nothing)."""
    model = cached_tool_model("hermes")
    with ServerProcess(model.path, "--served-model-name", "m") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(
            model="m", messages=first_turn(), tools=[WEATHER_TOOL], temperature=0,
            max_tokens=120, logprobs=True)
        choice = reply.choices[0]
        tokens = choice.logprobs.content
        # Usage also counts the end-of-turn token, which is not text (no logprob entry).
        assert reply.usage.completion_tokens == len(tokens) + 1
        text = "".join(t.token for t in tokens)
        assert text.startswith("<think>\n" + REASONING) and choice.message.content is None
        cut = client.chat.completions.create(
            model="m", messages=first_turn(), tools=[WEATHER_TOOL], temperature=0,
            max_tokens=3, logprobs=True).choices[0]
        assert cut.finish_reason == "length" and len(cut.logprobs.content) == 3
        assert cut.message.content is None or cut.message.content == ""

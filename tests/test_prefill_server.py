"""Prefill scheduling in the real server: a short request is not stuck behind a long
prompt's prefill, and a burst of requests sharing a prefix all get what they would alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import pytest
from server_process import ServerProcess

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_checkpoint) -> ServerProcess:
    model_dir: Path = tiny_checkpoint("qwen3", tokenizer="small")
    # Small prefill chunks: a long prompt takes hundreds of steps, the time a short request
    # would wait behind it.
    with ServerProcess(model_dir, "--served-model-name", MODEL, "--dtype", "float32",
                       "--prefill-step-size", "16", "--prefix-cache-bytes", "0") as started:
        yield started


def first_token_at(client: openai.OpenAI, prompt: str, times: dict[str, float], key: str
                   ) -> None:
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2,
                                       temperature=0.0, stream=True)
    for _ in stream:
        times.setdefault(key, time.monotonic())


def test_a_short_request_joins_a_long_prefill_instead_of_waiting(server) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    for _ in range(2):  # a few prefill steps: the scheduler's costs are measured from them
        client.completions.create(model=MODEL, prompt="warm up " * 40, max_tokens=2)
    long_prompt = " ".join(f"word{i % 97}" for i in range(1500))
    short_prompt = "A short question?"
    times: dict[str, float] = {}
    long_thread = threading.Thread(target=first_token_at,
                                   args=(client, long_prompt, times, "long"))
    long_thread.start()
    time.sleep(0.3)  # the long prompt is in its prefill (hundreds of 16-token chunks)
    sent = time.monotonic()
    first_token_at(client, short_prompt, times, "short")
    long_thread.join()
    assert times["short"] < times["long"], "the short request waited for the long prefill"
    assert times["short"] - sent < (times["long"] - sent) / 2

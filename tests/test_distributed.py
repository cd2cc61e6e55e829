"""One model served by two ranks under the real `mlx.launch` (ring backend on loopback),
against the same model in one process: greedy float32 answers must be identical for a
dense and an MoE model (completions, chat, tools under a grammar, streaming, concurrent
clients, a cancelled stream, a prefix-cache hit); a rank that dies or falls silent ends
the whole group within the step timeout, with 503 from rank 0; Ctrl-C stops every rank;
ranks that hold different models refuse to serve.

Every wait is bounded, so a broken group fails a test instead of hanging CI.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from distributed_process import LaunchedServer, free_port_pair
from parser_helpers import BOUNDED_TOOLS
from server_process import SWAN_SERVE, ServerProcess, eos_token_ids

MODEL = "tiny"
COMMON = ("--served-model-name", MODEL, "--dtype", "float32", "--prefix-cache-bytes", "64MiB",
          "--max-concurrency", "4")
# Short, so that a silent rank is noticed soon; a tiny model's step takes milliseconds.
STEP_TIMEOUT = 4.0
PROMPTS = ["The quick brown fox", "def main():\n    ", "Once upon a time", "1, 2, 3,"]


@pytest.fixture(scope="module", params=[("qwen3", "tensor"), ("qwen3_moe", "tensor"),
                                        ("qwen3_moe", "pipeline")], ids=lambda p: "-".join(p))
def setup(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(architecture, --parallel)"""
    return request.param


@pytest.fixture(scope="module")
def model_dir(setup: tuple[str, str], tiny_checkpoint) -> Path:
    return tiny_checkpoint(setup[0], tokenizer="small")


@pytest.fixture(scope="module")
def pair(model_dir: Path, setup: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[ServerProcess, LaunchedServer]]:
    """(one process, two ranks) serving the same model, started side by side. The dense
    model is quantized on first load: all three processes share one cache folder (one
    machine), so one of them builds it under the cache lock and the ranks then check they
    hold the same plan and weights."""
    quantize = setup == ("qwen3", "tensor")
    # Group 64: a tiny model's 128-wide o_proj split in two keeps whole groups (the budget
    # recipe may pick group 128 there; real models are wide enough for either).
    cache = ("--cache-dir", str(tmp_path_factory.mktemp("cache")),
             "--recipe", "uniform-4bit") if quantize else ()
    single = ServerProcess(model_dir, *COMMON, *cache, quantize=quantize)
    group = LaunchedServer(model_dir, tmp_path_factory.mktemp("ranks"), *COMMON, *cache,
                           "--parallel", setup[1], "--step-timeout", str(STEP_TIMEOUT),
                           quantize=quantize)
    starter = threading.Thread(target=single.start)
    starter.start()
    try:
        with group:
            starter.join()
            if quantize:
                [entry] = [p for p in Path(cache[1]).rglob("config.json")]
                assert (entry.parent / "swan-plan.json").exists()
            yield single, group
    finally:
        starter.join()
        single.stop()


def client_of(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def both(pair: tuple[ServerProcess, LaunchedServer], ask) -> tuple[object, object]:
    single, group = pair
    return ask(client_of(single)), ask(client_of(group))


def test_completions_match_one_process(pair) -> None:
    for prompt in PROMPTS:
        one, two = both(pair, lambda c, p=prompt: c.completions.create(
            model=MODEL, prompt=p, max_tokens=12, temperature=0))
        assert two.choices[0].text == one.choices[0].text
        assert two.choices[0].finish_reason == one.choices[0].finish_reason


def test_chat_streaming_and_prefix_hit_match(pair) -> None:
    messages = [{"role": "system", "content": "You answer briefly. " * 8},
                {"role": "user", "content": "Name a colour."}]

    def streamed(client: openai.OpenAI) -> str:
        chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    one, two = both(pair, lambda c: c.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0))
    assert two.choices[0].message.content == one.choices[0].message.content
    # The same conversation again starts from the cached prefix, on every rank.
    again_one, again_two = both(pair, lambda c: c.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0))
    assert again_two.usage.prompt_tokens_details.cached_tokens > 0
    assert again_two.usage.prompt_tokens_details.cached_tokens == \
        again_one.usage.prompt_tokens_details.cached_tokens
    assert again_two.choices[0].message.content == one.choices[0].message.content
    stream_one, stream_two = both(pair, streamed)
    assert stream_two == stream_one == one.choices[0].message.content


def test_tool_call_under_grammar_matches(pair) -> None:
    """Only rank 0 runs the grammar; the other rank follows its tokens."""
    def ask(client: openai.OpenAI):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Wake me at seven."}],
            tools=BOUNDED_TOOLS, tool_choice="required", parallel_tool_calls=False,
            max_tokens=60, temperature=0)

    one, two = both(pair, ask)
    assert two.choices[0].finish_reason == one.choices[0].finish_reason == "tool_calls"
    [call_one], [call_two] = one.choices[0].message.tool_calls, two.choices[0].message.tool_calls
    assert (call_two.function.name, call_two.function.arguments) == \
        (call_one.function.name, call_one.function.arguments)


def test_concurrent_clients_match(pair) -> None:
    def answers(client: openai.OpenAI) -> list[str]:
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(client.completions.create, model=MODEL, prompt=p,
                                   max_tokens=10, temperature=0) for p in PROMPTS]
            return [f.result().choices[0].text for f in futures]

    one, two = both(pair, answers)
    assert two == one


def test_cancelled_stream_then_next_request_matches(pair, model_dir: Path) -> None:
    single, group = pair
    banned = {str(t): -100 for t in eos_token_ids(model_dir)}
    conn = http.client.HTTPConnection("127.0.0.1", group.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({
        "model": MODEL, "prompt": "Count:", "max_tokens": 400, "stream": True,
        "logit_bias": banned}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.readline()  # the first event: it is decoding
    conn.close()
    active = group.wait_for_metric("swan_active_sequences", lambda v: v == 0, timeout=10)
    assert active == 0
    one, two = both(pair, lambda c: c.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0))
    assert two.choices[0].text == one.choices[0].text


def test_health_and_metrics_show_the_group(pair, setup: tuple[str, str]) -> None:
    _, group = pair
    deadline = time.monotonic() + 10
    while True:  # memory reports come every few seconds
        status, body = group.health()
        ranks = body["distributed"]["ranks"]
        if len(ranks) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200
    assert body["distributed"]["world_size"] == 2
    assert body["distributed"]["parallel"] == setup[1]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["peak_rss_bytes"] > 0 for r in ranks)
    metrics = group.metrics()
    assert metrics[f'swan_distributed_world_size{{parallel="{setup[1]}"}}'] == 2
    assert metrics['swan_rank_memory_bytes{rank="1",kind="peak_rss_bytes"}'] > 0
    assert metrics["swan_distributed_all_sum_bytes_total"] > 0


# ------------------------------------------------------------------ endings
# Each group's last test ends it, each a different way (a group start is the costly part).

ENDINGS = {("qwen3", "tensor"): "ctrl-c", ("qwen3_moe", "tensor"): "killed",
           ("qwen3_moe", "pipeline"): "silent"}


def test_the_group_ends(pair, setup: tuple[str, str], model_dir: Path) -> None:
    _, group = pair
    ending = ENDINGS[setup]
    if ending == "ctrl-c":
        _ctrl_c_stops_every_rank(group)
    else:
        _a_lost_rank_ends_the_group(group, model_dir, ending)


def _ctrl_c_stops_every_rank(group: LaunchedServer) -> None:
    assert len(group.group_pids()) >= 3  # the launcher and two ranks
    started = time.monotonic()
    group.stop()  # SIGINT to the whole session, as a terminal's Ctrl-C sends
    assert time.monotonic() - started < 15
    assert not group.group_pids()
    # Rank 0 ends as one process does on Ctrl-C (130) after telling rank 1 to stop.
    log = group.log()
    assert "swan-serve: error" not in log and "rank 1 exited" not in log, log


def _long_request(server: ServerProcess, model_dir: Path) -> dict:
    """A non-streamed request that decodes until stopped; returns its status and body."""
    banned = {str(t): -100 for t in eos_token_ids(model_dir)}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({
        "model": MODEL, "prompt": "Count:", "max_tokens": 20000, "logit_bias": banned}),
        {"Content-Type": "application/json"})
    response = conn.getresponse()
    return {"status": response.status, "body": json.loads(response.read())}


def _a_lost_rank_ends_the_group(group: LaunchedServer, model_dir: Path, fault: str) -> None:
    """Rank 1 killed (the ring breaks at once) or stopped (only the watchdog can tell):
    the request in flight gets 503, rank 0 exits 1 with one line, no rank is left."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_long_request, group, model_dir)
        group.wait_for_metric("swan_active_sequences", lambda v: v == 1, timeout=20)
        leader, follower = group.rank_pid(0), group.rank_pid(1)
        lost_at = time.monotonic()
        os.kill(follower, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        result = answer.result(timeout=STEP_TIMEOUT + 15)
    assert result["status"] == 503
    assert "distributed group failed" in result["body"]["error"]["message"]
    assert _exits(leader, STEP_TIMEOUT + 15)
    noticed = time.monotonic() - lost_at
    if fault == "silent":
        assert noticed >= STEP_TIMEOUT * 0.8  # the watchdog, not the launcher, ended it
        # A stopped process cannot act on the launcher's SIGTERM until it runs again.
        os.kill(follower, signal.SIGCONT)
    assert noticed < STEP_TIMEOUT + 10
    assert group.wait_until_gone(15), "a rank was left running"
    log = group.log()
    errors = [line for line in log.splitlines() if line.startswith("swan-serve: error: rank 0")]
    assert len(errors) == 1, log
    assert "Node with rank 0 exited with code 1" in log


def _exits(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------ refusals


def test_ranks_holding_different_models_refuse_to_serve(tiny_checkpoint, tmp_path: Path) -> None:
    """Launched by hand the way mlx.launch does (MLX_RANK, MLX_HOSTFILE), to give each
    rank a different MODEL."""
    models = [tiny_checkpoint("qwen3", tokenizer="small"),
              tiny_checkpoint("qwen3", tokenizer="small", seed=1)]
    port = free_port_pair()
    ring = tmp_path / "ring.json"
    ring.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    ranks = [subprocess.Popen(
        [str(SWAN_SERVE), str(model), "--no-quantize", "--port", "0"],
        env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(ring)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank, model in enumerate(models)]
    try:
        outputs = [p.communicate(timeout=60)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    for process, output in zip(ranks, outputs, strict=True):
        assert process.returncode != 0
        errors = [line for line in output.splitlines() if line.startswith("swan-serve: error:")]
        assert len(errors) == 1, output
        assert "disagrees with rank 0 on the model" in errors[0]


def test_parallel_needs_a_launcher() -> None:
    done = subprocess.run([str(SWAN_SERVE), "--parallel", "tensor"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("swan-serve: error: --parallel needs several ranks: "
                                   "start swan-serve under mlx.launch")

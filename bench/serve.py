"""swan-serve against mlx_lm.server: same model, same load, one run, one table.

    .venv/bin/python bench/serve.py                 # builds a q4 Qwen3 fixture in bench/out/
    .venv/bin/python bench/serve.py --model DIR     # any local MLX model directory
    .venv/bin/python bench/serve.py --quick         # smaller load, for a smoke run

For each server in turn (never both at once, so they do not share the CPU) it starts the
real process on loopback, warms it up, then for 1, 8 and 32 concurrent clients runs the same
streaming chat requests (greedy, end-of-sequence tokens banned through logit_bias so every
request generates exactly --max-tokens tokens) and reports requests/s, aggregate generated
tokens/s and TTFT p50/p99. Single-client decode speed is compared with raw mlx_lm
stream_generate on the same model, run in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from server_process import ServerProcess, eos_token_ids  # noqa: E402

OUT = REPO / "bench" / "out"
# Big enough that a decode step is mostly model compute, small enough for 2 CPU cores.
FIXTURE_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)


# ---------------------------------------------------------------- model


def fixture_model() -> Path:
    """A Qwen3 fixture (random weights, small tokenizer) quantized to 4 bits by mlx_lm."""
    source, quantized = OUT / "qwen3-bench-bf16", OUT / "qwen3-bench-q4"
    if not (quantized / "config.json").exists():
        from mlx_lm import convert

        from swan_serve.quant.fixtures import write_checkpoint

        if not (source / "config.json").exists():
            write_checkpoint(source, "qwen3", seed=0, tokenizer="small",
                             overrides=FIXTURE_SHAPE, overwrite=True)
        convert(str(source), str(quantized), quantize=True, q_bits=4, q_group_size=64)
    return quantized


RAW_DECODE = """
import sys
from pathlib import Path
import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.utils import load_model, load_tokenizer
path, dtype, max_tokens = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
model, config = load_model(path)
tokenizer = load_tokenizer(path)
tokenizer.eos_token_ids = set()  # always generate max_tokens, like the served requests
if dtype != "model":
    model.set_dtype(getattr(mx, dtype))
mx.eval(model.parameters())
prompt = "Once upon a time there was a robot"
print("ready", flush=True)
for _ in sys.stdin:  # one timed run per line
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        pass
    print(last.generation_tps, flush=True)
"""


class RawDecoder:
    """Raw mlx_lm stream_generate in its own process, timed one run at a time, so it can
    take turns with the servers."""

    def __init__(self, model_dir: Path, dtype: str, max_tokens: int):
        self._process = subprocess.Popen(
            [sys.executable, "-c", RAW_DECODE, str(model_dir), dtype, str(max_tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._readline() == "ready"
        self.run()  # warm-up

    def _readline(self) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"raw decode process exited with {self._process.wait()}")
        return line

    def run(self) -> float:
        assert self._process.stdin is not None
        self._process.stdin.write("run\n")
        self._process.stdin.flush()
        return float(self._readline())

    def close(self) -> None:
        if self._process.stdin:
            self._process.stdin.close()
        self._process.wait(30)


# ---------------------------------------------------------------- load


@dataclass
class Sample:
    ttft: float
    total: float
    tokens: int
    decode_tps: float


def _connect(port: int, body: dict) -> tuple[http.client.HTTPConnection, Any]:
    """Sends the request; retries refused/reset connections (a small listen backlog
    resets bursts of connects), which then count in that request's TTFT."""
    for attempt in range(100):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body),
                         {"Content-Type": "application/json"})
            return conn, conn.getresponse()
        except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
            conn.close()
            time.sleep(0.02 * (attempt + 1))
    raise RuntimeError("could not connect after 100 attempts")


def stream_request(port: int, body: dict) -> Sample:
    """One streaming chat request; counts content chunks and reads usage when sent."""
    start = time.perf_counter()
    conn, response = _connect(port, body)
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first = last = None
    chunks, usage_tokens = 0, None
    while line := response.readline():
        line = line.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        event = json.loads(line[5:])
        if event.get("usage"):
            usage_tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices", []):
            if choice.get("delta", {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    conn.close()
    end = time.perf_counter()
    tokens = usage_tokens if usage_tokens is not None else chunks
    first = first or end
    decode = (tokens - 1) / (last - first) if last and last > first and tokens > 1 else 0.0
    return Sample(first - start, end - start, tokens, decode)


@dataclass
class LoadResult:
    clients: int
    wall: float
    samples: list[Sample]

    @property
    def requests_per_s(self) -> float:
        return len(self.samples) / self.wall

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall

    def ttft_ms(self, q: float) -> float:
        values = sorted(s.ttft for s in self.samples)
        return 1000 * values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_load(port: int, model: str, clients: int, requests_each: int, max_tokens: int,
             banned: list[int]) -> LoadResult:
    samples: list[Sample] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        barrier.wait()
        for r in range(requests_each):
            body = {
                "model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True},
                "logit_bias": {str(t): -100 for t in banned},
                # Unique from its first word on (the same for every server): only the chat
                # template's opening tokens are shared, so a prefix cache (mlx_lm.server
                # has one, swan-serve's comes later) saves next to nothing.
                "messages": [{"role": "user", "content":
                              f"{clients}.{index}.{r} Please tell me a story."}],
            }
            try:
                sample = stream_request(port, body)
            except BaseException as exc:  # report after the run
                with lock:
                    errors.append(exc)
                return
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return LoadResult(clients, wall, samples)


def single_decode(port: int, model: str, max_tokens: int, banned: list[int]) -> float:
    """One single-client stream: decode tokens/s after the first token."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True},
            "logit_bias": {str(t): -100 for t in banned},
            "messages": [{"role": "user", "content": "Once upon a time there was a robot"}]}
    return stream_request(port, body).decode_tps


def bench_servers(servers: dict[str, tuple[ServerProcess, str]], levels: list[tuple[int, int]],
                  max_tokens: int, banned: list[int], raw: dict[str, RawDecoder]
                  ) -> tuple[dict[str, dict[int, LoadResult]], dict[str, float]]:
    """All servers run (idle) side by side and take turns at each load level, so a change
    in the machine's other load hits every server alike. Only one is loaded at a time."""
    results: dict[str, dict[int, LoadResult]] = {label: {} for label in servers}
    decode: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        for server, model in servers.values():
            stack.enter_context(server)
            run_load(server.port, model, 2, 1, 8, banned)  # warm-up: first batches, compiles
        for clients, requests_each in levels:
            for label, (server, model) in servers.items():
                result = run_load(server.port, model, clients, requests_each, max_tokens,
                                  banned)
                print(f"  {label:>24} clients={clients:<3} {result.tokens_per_s:8.1f} tok/s "
                      f"{result.requests_per_s:6.2f} req/s  "
                      f"TTFT p50 {result.ttft_ms(0.5):.0f} ms", flush=True)
                results[label][clients] = result
        # Single-client decode: servers and raw stream_generate take turns, best of three.
        for _ in range(3):
            for label, (server, model) in servers.items():
                speed = single_decode(server.port, model, 4 * max_tokens, banned)
                decode[label] = max(decode.get(label, 0.0), speed)
            for label, decoder in raw.items():
                decode[label] = max(decode.get(label, 0.0), decoder.run())
        for label, speed in decode.items():
            print(f"  {label:>34} single-client decode {speed:.1f} tok/s", flush=True)
    return results, decode


# ---------------------------------------------------------------- report


def print_table(results: dict[str, dict[int, LoadResult]], baseline: str, contender: str) -> None:
    print()
    print("| clients | server | requests/s | aggregate tokens/s | TTFT p50 (ms) | TTFT p99 (ms) |")
    print("|---:|---|---:|---:|---:|---:|")
    levels = sorted(next(iter(results.values())))
    for clients in levels:
        for name, by_level in results.items():
            r = by_level[clients]
            print(f"| {clients} | {name} | {r.requests_per_s:.2f} | {r.tokens_per_s:.1f} | "
                  f"{r.ttft_ms(0.5):.0f} | {r.ttft_ms(0.99):.0f} |")
    print()
    print(f"| clients | {contender} / {baseline} aggregate tokens/s | requests/s ratio |")
    print("|---:|---:|---:|")
    for clients in levels:
        ours, theirs = results[contender][clients], results[baseline][clients]
        print(f"| {clients} | {ours.tokens_per_s / theirs.tokens_per_s:.2f}x | "
              f"{ours.requests_per_s / theirs.requests_per_s:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="local MLX model dir (default: q4 fixture)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="one request per client")
    parser.add_argument("--skip-same-dtype", action="store_true",
                        help="do not also run swan-serve with --dtype model")
    args = parser.parse_args(argv)

    model_dir = (args.model or fixture_model()).resolve()
    name = model_dir.name
    banned = eos_token_ids(model_dir)
    levels = [(1, 2 if args.quick else 4), (8, 1 if args.quick else 2), (32, 1)]
    concurrency = ["--max-concurrency", "32", "--max-queue", "64"]
    print(f"model {model_dir}; {args.max_tokens} tokens per request; "
          f"clients x requests: {levels}", flush=True)

    runs = {
        "swan-serve": ServerProcess(model_dir, *concurrency, "--served-model-name", name),
        "mlx_lm.server": ServerProcess(
            None, command=[sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir),
                           "--decode-concurrency", "32", "--log-level", "WARNING"]),
    }
    if not args.skip_same_dtype:
        runs["swan-serve --dtype model"] = ServerProcess(
            model_dir, *concurrency, "--served-model-name", name, "--dtype", "model")
    # mlx_lm.server calls the model it was started with "default_model".
    servers = {label: (server, "default_model" if label == "mlx_lm.server" else name)
               for label, server in runs.items()}
    raw = {f"raw stream_generate ({dtype} dtype)": RawDecoder(model_dir, dtype,
                                                              4 * args.max_tokens)
           for dtype in ("model", "float32")}
    try:
        results, decode = bench_servers(servers, levels, args.max_tokens, banned, raw)
    finally:
        for decoder in raw.values():
            decoder.close()
    print_table({k: results[k] for k in ("swan-serve", "mlx_lm.server")}, "mlx_lm.server",
                "swan-serve")
    if "swan-serve --dtype model" in results:
        print_table({k: results[k] for k in ("swan-serve --dtype model", "mlx_lm.server")},
                    "mlx_lm.server", "swan-serve --dtype model")

    print(f"\nsingle-client decode, {4 * args.max_tokens} tokens, best of 3 "
          "(tokens/s after the first token)")
    print("| path | tokens/s | swan-serve / path |")
    print("|---|---:|---:|")
    for label, tps in decode.items():
        print(f"| {label} | {tps:.1f} | {decode['swan-serve'] / tps:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

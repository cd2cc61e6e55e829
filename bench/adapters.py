"""Per-request overhead of each API adapter: time from a request's arrival to its submission
to the engine (body, validation, translation to the internal chat request, chat template,
tokenization, constraints), on one server, in one run.

    .venv/bin/python bench/adapters.py            # 40 rounds
    .venv/bin/python bench/adapters.py --rounds 10

The same agent-like conversation (a system prompt, four tools, a tool call and its result,
then a new question) goes to /v1/chat/completions, /v1/messages and /v1/responses, each in
its own wire format, round-robin in rotating order so that the machine's other load falls
on all three alike. Requests are sequential and non-streaming with max_tokens 1; the
server's own counter (swan_request_to_engine_seconds_total in /metrics) gives each request's
figure. Reported per route: the best run (the machine's other load only adds time), the
median and p90, and the ratios of best and median to chat completions.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from server_process import ServerProcess  # noqa: E402

OUT = REPO / "bench" / "out"
SYSTEM = ("You are a coding agent working in a repository. Read files before you change "
          "them, keep edits small, run the tests after each change and report briefly. "
          * 12)
TOOLS = [
    {"name": name, "description": f"{name.replace('_', ' ')} in the workspace.",
     "parameters": {"type": "object", "properties": props, "required": sorted(props)}}
    for name, props in [
        ("read_file", {"path": {"type": "string"}}),
        ("write_file", {"path": {"type": "string"}, "content": {"type": "string"}}),
        ("run_tests", {"pattern": {"type": "string"}}),
        ("search", {"query": {"type": "string"}, "limit": {"type": "integer"}}),
    ]
]
QUESTION = "Fix the failing test in tests/test_parser.py."
CALL = {"name": "read_file", "arguments": {"path": "tests/test_parser.py"}}
RESULT = "def test_parse():\n    assert parse('1 + 2') == 3\n" * 8
NEXT = "Now run the tests."


def chat_body() -> dict:
    call = {"id": "call_1", "type": "function",
            "function": {"name": CALL["name"], "arguments": json.dumps(CALL["arguments"])}}
    return {"model": "m", "max_tokens": 1, "temperature": 0,
            "tools": [{"type": "function", "function": t} for t in TOOLS],
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": QUESTION},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
                         {"role": "user", "content": NEXT}]}


def messages_body() -> dict:
    return {"model": "m", "max_tokens": 1, "temperature": 0, "system": SYSTEM,
            "tools": [{"name": t["name"], "description": t["description"],
                       "input_schema": t["parameters"]} for t in TOOLS],
            "messages": [
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1",
                                                   "name": CALL["name"],
                                                   "input": CALL["arguments"]}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": RESULT},
                    {"type": "text", "text": NEXT}]}]}


def responses_body() -> dict:
    return {"model": "m", "max_output_tokens": 1, "temperature": 0, "instructions": SYSTEM,
            "store": False, "tools": [{"type": "function", **t} for t in TOOLS],
            "input": [{"role": "user", "content": QUESTION},
                      {"type": "function_call", "call_id": "call_1", "name": CALL["name"],
                       "arguments": json.dumps(CALL["arguments"])},
                      {"type": "function_call_output", "call_id": "call_1", "output": RESULT},
                      {"role": "user", "content": NEXT}]}


ROUTES = {"/v1/chat/completions": chat_body, "/v1/messages": messages_body,
          "/v1/responses": responses_body}


def post(port: int, path: str, body: dict) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    elapsed = time.perf_counter() - start
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {payload[:300]!r}")
    return elapsed


def engine_seconds(server: ServerProcess, path: str) -> float:
    return server.metrics().get(f'swan_request_to_engine_seconds_total{{route="{path}"}}', 0.0)


def fixture_model() -> Path:
    """A tiny Qwen3 (random weights) with the real Qwen3 tokenizer and chat template when
    ../shared has them: the template and tokenizer are what the adapters feed."""
    path = OUT / "qwen3-adapters"
    if not (path / "config.json").exists():
        from swan_serve.quant.fixtures import write_checkpoint

        write_checkpoint(path, "qwen3", seed=0, overwrite=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--model", type=Path, help="a local MLX model (default: a fixture)")
    args = parser.parse_args()
    model = args.model or fixture_model()
    samples: dict[str, list[tuple[float, float]]] = {path: [] for path in ROUTES}
    with ServerProcess(model, "--served-model-name", "m") as server:
        for path, body in ROUTES.items():  # warm-up: templates, tokenizer stretches, grammar
            for _ in range(3):
                post(server.port, path, body())
        order = list(ROUTES)
        for round_ in range(args.rounds):
            for path in order[round_ % 3:] + order[: round_ % 3]:
                before = engine_seconds(server, path)
                total = post(server.port, path, ROUTES[path]())
                samples[path].append((engine_seconds(server, path) - before, total))
    chat = sorted(s for s, _ in samples["/v1/chat/completions"])
    print(f"model: {model}  rounds: {args.rounds}")
    print("| route | request to engine, best ms | p50 ms | p90 ms | best vs chat | p50 vs chat "
          "| round trip p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for path, rows in samples.items():
        to_engine = sorted(s for s, _ in rows)
        best, p50 = to_engine[0], statistics.median(to_engine)
        p90 = to_engine[int(0.9 * (len(to_engine) - 1))]
        total = statistics.median(t for _, t in rows)
        print(f"| {path} | {best * 1e3:.2f} | {p50 * 1e3:.2f} | {p90 * 1e3:.2f} "
              f"| {best / chat[0]:.2f}x | {p50 / statistics.median(chat):.2f}x "
              f"| {total * 1e3:.1f} |")


if __name__ == "__main__":
    main()

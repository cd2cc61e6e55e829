"""What enforcing declared-only tool calls costs while decoding: generated tokens/s of one
client with no tools, with tools and tool_choice "auto" (free text under the declared-calls
grammar: llguidance computes a token mask every step), and with tool_choice "none" (one
banned token), on one server, interleaved.

    .venv/bin/python bench/declared_calls.py [--rounds 6] [--tokens 96] [--model DIR]

The fixture is a tiny Qwen3 with the real Qwen3 tokenizer (151k tokens, so the mask covers
a real vocabulary); on such a small model a step is short, so the mask's share of it is
larger than it would be on a real model.
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
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from adapters import TOOLS, fixture_model  # noqa: E402
from server_process import ServerProcess  # noqa: E402

CASES = {
    "no tools": {},
    "tools, auto": {"tools": [{"type": "function", "function": t} for t in TOOLS],
                    "tool_choice": "auto"},
    "tools, none": {"tools": [{"type": "function", "function": t} for t in TOOLS],
                    "tool_choice": "none"},
}


def tokens_per_second(port: int, extra: dict, tokens: int) -> float:
    body = {"model": "m", "max_tokens": tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me a long story."}], **extra}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Content-Type": "application/json"})
    reply = json.loads(connection.getresponse().read())
    elapsed = time.perf_counter() - start
    connection.close()
    return reply["usage"]["completion_tokens"] / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    model = args.model or fixture_model()
    rates: dict[str, list[float]] = {name: [] for name in CASES}
    with ServerProcess(model, "--served-model-name", "m", "--prefix-cache-bytes", "0") as s:
        for extra in CASES.values():  # warm-up: grammar compiled once per tool set
            tokens_per_second(s.port, extra, 8)
        names = list(CASES)
        for round_ in range(args.rounds):
            for name in names[round_ % 3:] + names[: round_ % 3]:
                rates[name].append(tokens_per_second(s.port, CASES[name], args.tokens))
    base = statistics.median(rates["no tools"])
    print(f"model: {model}  rounds: {args.rounds}  tokens: {args.tokens}")
    print("| request | tokens/s p50 | best | p50 vs no tools |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        p50 = statistics.median(values)
        print(f"| {name} | {p50:.1f} | {max(values):.1f} | {p50 / base:.2f}x |")


if __name__ == "__main__":
    main()

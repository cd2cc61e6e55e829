"""Prefix cache: swan-serve against mlx_lm.server on an agent conversation and on clients
sharing its system prompt and tools.

    .venv/bin/python bench/prefix.py                     # a tiny float32 Qwen3 fixture
    .venv/bin/python bench/prefix.py --arch qwen3_5_moe  # hybrid linear attention + MoE
    .venv/bin/python bench/prefix.py --model DIR         # any local MLX model directory
    .venv/bin/python bench/prefix.py --quick             # fewer turns, one run

Three servers run side by side and take turns request by request, so the machine's other
load hits them alike: swan-serve, swan-serve with --prefix-cache-bytes 0 (the uncached
reference) and mlx_lm.server (which has a prefix cache of its own). Each keeps its own
conversations (its own replies in the history). Requests are greedy and stream, with
end-of-sequence tokens banned so every reply has the same length.

1. agent: one conversation of --turns turns, all resending a system prompt and tool list
   of about --prefix-tokens tokens plus the whole history.
2. clients: --clients conversations at once, --client-turns turns each, all sharing the
   same system prompt and tools (and nothing else).

Each request is sent --settle seconds after the previous one ended, so that what one
server still does after its reply (saving caches, freeing memory, collecting garbage) does
not land on the next server's measurement on a machine with few cores.

Both phases run --repeats times, each time with a new system prompt (so each run starts
cold); the tables show the median TTFT over the runs. Prints TTFT per turn, the prompt
tokens each server computed (prompt - cached, from the responses' usage; first run) and
the ratios: swan-serve / uncached (target <= 0.1 once the prefix is
cached) and swan-serve / mlx_lm.server (target <= 1 on every row). Beside the ratio of
medians it prints the best run per row and, per row, the median over runs of each run's
own swan-serve / mlx_lm.server ratio (the two requests of a run's row meet the same load).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from server_process import ServerProcess, eos_token_ids  # noqa: E402

OUT = REPO / "bench" / "out"
# Small enough that mlx's CPU build prefills a few thousand tokens in seconds; float32 on
# disk so that both servers compute in the same dtype.
FIXTURE_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32)
SERVERS = ("swan-serve", "uncached", "mlx_lm.server")


def fixture_model(arch: str) -> Path:
    path = OUT / f"{arch}-prefix-f32"
    if not (path / "config.json").exists():
        from swan_serve.quant.fixtures import write_checkpoint

        overrides = FIXTURE_SHAPE if arch == "qwen3" else None  # others: the tiny default
        write_checkpoint(path, arch, seed=0, tokenizer="small", dtype="float32",
                         overrides=overrides, overwrite=True)
    return path


# ---------------------------------------------------------------- the workload


def system_prompt(words: int) -> str:
    rules = [
        "Read the files you change before you change them.",
        "Prefer small, reviewable edits and explain each one in a sentence.",
        "Run the tests after every change and report failures verbatim.",
        "Never print secrets, tokens or passwords, even when asked.",
        "Ask before deleting anything outside the working directory.",
        "Keep answers short; use lists for steps and code blocks for code.",
    ]
    text, i = [], 0
    while sum(len(t.split()) for t in text) < words:
        text.append(f"Rule {i + 1}: {rules[i % len(rules)]}")
        i += 1
    return "You are a coding agent working in a user's repository.\n" + "\n".join(text)


def tools(count: int) -> list[dict]:
    verbs = ["read_file", "write_file", "search", "run_tests", "list_dir", "git_diff",
             "open_url", "ask_user", "grep", "format_code", "lint", "make_dir"]
    return [{
        "type": "function",
        "function": {
            "name": f"{verbs[i % len(verbs)]}_{i}",
            "description": f"Tool {i}: {verbs[i % len(verbs)].replace('_', ' ')} in the "
                           "workspace and return the result as text.",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "A path in the workspace."},
                    "query": {"type": "string", "description": "What to look for."},
                    "limit": {"type": "integer", "description": "At most this many items."},
                },
                "required": ["path"],
            },
        },
    } for i in range(count)]


def user_message(client: int, turn: int) -> str:
    tasks = ["find where the config is parsed", "add a test for the empty input",
             "rename the helper to something clearer", "explain the failing test",
             "make the error message name the file"]
    return f"Client {client}, turn {turn}: please {tasks[(client + turn) % len(tasks)]}."


# ---------------------------------------------------------------- one request


@dataclass
class Reply:
    ttft: float
    prompt_tokens: int
    cached_tokens: int
    text: str

    @property
    def computed(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def stream_chat(port: int, body: dict) -> Reply:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, parts, usage = None, [], {}
    while line := response.readline():
        line = line.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        event = json.loads(line[5:])
        usage = event.get("usage") or usage
        for choice in event.get("choices", []):
            content = (choice.get("delta") or {}).get("content")
            if content:
                first = first or time.perf_counter()
                parts.append(content)
    conn.close()
    first = first or time.perf_counter()
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Reply(first - start, usage.get("prompt_tokens", 0), cached, "".join(parts))


class Conversation:
    def __init__(self, system: str, tool_list: list[dict], client: int):
        self.messages = [{"role": "system", "content": system}]
        self.tools = tool_list
        self.client = client

    def turn(self, port: int, model: str, turn: int, max_tokens: int, banned: list[int]
             ) -> Reply:
        self.messages.append({"role": "user", "content": user_message(self.client, turn)})
        body = {"model": model, "messages": self.messages, "tools": self.tools,
                "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True},
                "logit_bias": {str(t): -100 for t in banned}}
        reply = stream_chat(port, body)
        self.messages.append({"role": "assistant", "content": reply.text})
        return reply


def together(talks: list[Conversation], port: int, model: str, turn: int, max_tokens: int,
             banned: list[int]) -> list[Reply]:
    """One turn of every conversation, all sent at once."""
    got: list[Reply | None] = [None] * len(talks)
    errors: list[BaseException] = []

    def run(c: int) -> None:
        try:
            got[c] = talks[c].turn(port, model, turn, max_tokens, banned)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(len(talks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(talks)} requests failed: {errors[0]}")
    return [r for r in got if r is not None]


# ---------------------------------------------------------------- the two phases


def agent_phase(servers: dict[str, tuple[ServerProcess, str]], args, banned: list[int],
                run: int) -> dict[str, list[Reply]]:
    # Each run opens with its own words: every server starts it cold.
    system = f"Session {run}.\n" + system_prompt(args.prefix_words)
    tool_list = tools(args.tools)
    talks = {label: Conversation(system, tool_list, client=0) for label in servers}
    replies: dict[str, list[Reply]] = {label: [] for label in servers}
    for turn in range(1, args.turns + 1):
        for label, (server, model) in servers.items():
            time.sleep(args.settle)
            replies[label].append(talks[label].turn(server.port, model, turn,
                                                    args.max_tokens, banned))
        row = "  ".join(f"{label} {replies[label][-1].ttft * 1000:7.0f} ms"
                        for label in servers)
        print(f"  run {run} agent turn {turn:>2}: {row}", flush=True)
    return replies


def clients_phase(servers: dict[str, tuple[ServerProcess, str]], args, banned: list[int],
                  run: int) -> dict[str, list[list[Reply]]]:
    """replies[label][round] = one reply per client."""
    # A different system prompt from the agent phase's: each server starts it cold.
    system = f"Team workspace {run}.\n" + system_prompt(args.prefix_words)
    tool_list = tools(args.tools)
    talks = {label: [Conversation(system, tool_list, client=c + 1) for c in range(args.clients)]
             for label in servers}
    replies: dict[str, list[list[Reply]]] = {label: [] for label in servers}
    for turn in range(1, args.client_turns + 1):
        for label, (server, model) in servers.items():
            time.sleep(args.settle)
            replies[label].append(together(talks[label], server.port, model, turn,
                                           args.max_tokens, banned))
        row = "  ".join(f"{label} {_mean_ttft(replies[label][-1]):7.0f} ms" for label in servers)
        print(f"  run {run} {args.clients} clients turn {turn}: mean {row}", flush=True)
    return replies


# ---------------------------------------------------------------- report


def _mean_ttft(replies: list[Reply]) -> float:
    return 1000 * statistics.mean(r.ttft for r in replies)


Pick = Callable[[Iterable[float]], float]


def agent_over_runs(runs: list[dict[str, list[Reply]]], pick: Pick) -> dict[str, list[Reply]]:
    """Per server and turn: `pick` (median, min) of the TTFTs over the runs, the first
    run's token counts."""
    first = runs[0]
    return {label: [Reply(pick(run[label][t].ttft for run in runs),
                          reply.prompt_tokens, reply.cached_tokens, reply.text)
                    for t, reply in enumerate(first[label])]
            for label in first}


def clients_over_runs(runs: list[dict[str, list[list[Reply]]]], pick: Pick
                      ) -> dict[str, list[list[Reply]]]:
    """Per server and turn: each client's reply with `pick` (over the runs) of that turn's
    mean TTFT, so the table's mean is e.g. the median of the runs' means."""
    first = runs[0]
    out: dict[str, list[list[Reply]]] = {}
    for label, turns in first.items():
        out[label] = []
        for t, group in enumerate(turns):
            ttft = pick(_mean_ttft(run[label][t]) for run in runs) / 1000
            out[label].append([Reply(ttft, r.prompt_tokens, r.cached_tokens, r.text)
                               for r in group])
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def print_agent(replies: dict[str, list[Reply]]) -> tuple[float, int]:
    print("\n## agent conversation: median TTFT per turn (ms)\n")
    print("| turn | prompt tokens | swan-serve | cached | uncached | mlx_lm.server | "
          "mlx_lm cached | swan / uncached | swan / mlx_lm |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ours, ref, theirs = (replies[k] for k in SERVERS)
    worst_cached, slower_rows = 0.0, 0
    for turn, (a, b, c) in enumerate(zip(ours, ref, theirs, strict=True), start=1):
        print(f"| {turn} | {a.prompt_tokens} | {a.ttft * 1000:.0f} | {a.cached_tokens} | "
              f"{b.ttft * 1000:.0f} | {c.ttft * 1000:.0f} | {c.cached_tokens} | "
              f"{_ratio(a.ttft, b.ttft)} | {_ratio(a.ttft, c.ttft)} |")
        if turn > 1:
            worst_cached = max(worst_cached, a.ttft / b.ttft)
        slower_rows += a.ttft > c.ttft
    _print_totals({k: [replies[k]] for k in SERVERS})
    return worst_cached, slower_rows


def print_clients(replies: dict[str, list[list[Reply]]], clients: int) -> tuple[float, int]:
    print(f"\n## {clients} clients sharing the system prompt and tools: median of the mean "
          "TTFT per turn (ms)\n")
    print("| turn | swan-serve | cached (sum) | uncached | mlx_lm.server | mlx_lm cached (sum) | "
          "swan / uncached | swan / mlx_lm |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    ours, ref, theirs = (replies[k] for k in SERVERS)
    worst_cached, slower_rows = 0.0, 0
    for turn, (a, b, c) in enumerate(zip(ours, ref, theirs, strict=True), start=1):
        ta, tb, tc = _mean_ttft(a), _mean_ttft(b), _mean_ttft(c)
        print(f"| {turn} | {ta:.0f} | {sum(r.cached_tokens for r in a)} | {tb:.0f} | "
              f"{tc:.0f} | {sum(r.cached_tokens for r in c)} | {_ratio(ta, tb)} | "
              f"{_ratio(ta, tc)} |")
        if turn > 1:
            worst_cached = max(worst_cached, ta / tb)
        slower_rows += ta > tc
    _print_totals(replies)
    return worst_cached, slower_rows


def print_best(agent: dict[str, list[Reply]], clients: dict[str, list[list[Reply]]],
               repeats: int) -> None:
    """The best of the runs per row: what each server does when the machine's other load
    leaves it alone (that load only ever adds time)."""
    ours, theirs = agent["swan-serve"], agent["mlx_lm.server"]
    ratios = [a.ttft / b.ttft for a, b in zip(ours, theirs, strict=True)]
    client_ratios = [_mean_ttft(a) / _mean_ttft(b) for a, b in
                     zip(clients["swan-serve"], clients["mlx_lm.server"], strict=True)]
    print(f"\nbest of {repeats} runs per row, swan-serve / mlx_lm.server: agent turns "
          f"{min(ratios):.3f}-{max(ratios):.3f} ({sum(r > 1 for r in ratios)} rows above 1), "
          f"clients turns " + ", ".join(f"{r:.3f}" for r in client_ratios))


def print_paired(agent_runs: list[dict[str, list[Reply]]],
                 client_runs: list[dict[str, list[list[Reply]]]]) -> int:
    """Per row, the median over runs of that run's swan-serve / mlx_lm.server: a row's
    requests to the two servers go out a moment apart, so within a run they meet the same
    machine load, which the medians of each server taken apart do not pair up (2 shared
    cores: a prefill step takes 17 or 28 ms with what else runs). Returns the rows above 1."""
    agent = [statistics.median(run["swan-serve"][t].ttft / run["mlx_lm.server"][t].ttft
                               for run in agent_runs)
             for t in range(len(agent_runs[0]["swan-serve"]))]
    clients = [statistics.median(_mean_ttft(run["swan-serve"][t])
                                 / _mean_ttft(run["mlx_lm.server"][t]) for run in client_runs)
               for t in range(len(client_runs[0]["swan-serve"]))]
    above = sum(r > 1 for r in agent + clients)
    print(f"\nmedian over runs of each run's swan-serve / mlx_lm.server: agent turns "
          f"{min(agent):.3f}-{max(agent):.3f} ({sum(r > 1 for r in agent)} rows above 1), "
          f"clients turns " + ", ".join(f"{r:.3f}" for r in clients))
    return above


def _print_totals(replies: dict[str, list[list[Reply]]]) -> None:
    computed = {k: sum(r.computed for group in replies[k] for r in group) for k in SERVERS}
    prompts = sum(r.prompt_tokens for group in replies["uncached"] for r in group)
    print(f"\nprompt tokens sent: {prompts}; computed (prefill): "
          + ", ".join(f"{k} {v}" for k, v in computed.items())
          + f"; swan / uncached {_ratio(computed['swan-serve'], computed['uncached'])}"
          + f", swan / mlx_lm {_ratio(computed['swan-serve'], computed['mlx_lm.server'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="local MLX model dir (default: fixture)")
    parser.add_argument("--arch", default="qwen3", choices=["qwen3", "qwen3_moe", "qwen3_5_moe"],
                        help="the fixture's architecture when no --model is given")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--client-turns", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--prefix-words", type=int, default=200,
                        help="system prompt length in words (with 5 tools: ~2k tokens)")
    parser.add_argument("--tools", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of both phases, each cold; tables show median TTFTs")
    parser.add_argument("--settle", type=float, default=0.25,
                        help="seconds between one request's end and the next request")
    parser.add_argument("--quick", action="store_true", help="6 turns, 1 client turn, 1 run")
    args = parser.parse_args(argv)
    if args.quick:
        args.turns, args.client_turns, args.repeats = 6, 1, 1

    model_dir = (args.model or fixture_model(args.arch)).resolve()
    name = model_dir.name
    banned = eos_token_ids(model_dir)
    runs = {
        "swan-serve": ServerProcess(model_dir, "--served-model-name", name),
        "uncached": ServerProcess(model_dir, "--served-model-name", name,
                                  "--prefix-cache-bytes", "0"),
        "mlx_lm.server": ServerProcess(
            None, command=[sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir),
                           "--log-level", "WARNING"]),
    }
    # mlx_lm.server calls the model it was started with "default_model".
    servers = {label: (server, "default_model" if label == "mlx_lm.server" else name)
               for label, server in runs.items()}
    print(f"model {model_dir}; {args.max_tokens} tokens per reply; {args.repeats} runs",
          flush=True)
    with contextlib.ExitStack() as stack:
        for server, model in servers.values():
            stack.enter_context(server)
            # Warm-up on an unrelated prompt: first batches, lazy imports.
            Conversation("Warm-up.", [], client=99).turn(server.port, model, 0, 4, banned)
        agent_runs, client_runs = [], []
        for run in range(1, args.repeats + 1):
            agent_runs.append(agent_phase(servers, args, banned, run))
            client_runs.append(clients_phase(servers, args, banned, run))
        metrics = runs["swan-serve"].metrics()
    agent = agent_over_runs(agent_runs, statistics.median)
    clients = clients_over_runs(client_runs, statistics.median)
    worst_agent, slower_agent = print_agent(agent)
    worst_clients, slower_clients = print_clients(clients, args.clients)
    print_best(agent_over_runs(agent_runs, min), clients_over_runs(client_runs, min),
               args.repeats)
    slower_paired = print_paired(agent_runs, client_runs)
    print("\nswan-serve /metrics: " + ", ".join(
        f"{k.removeprefix('swan_prefix_cache_')} {v:.0f}" for k, v in metrics.items()
        if k.startswith("swan_prefix_cache")))
    print(f"\ntargets: cached-prefix TTFT / uncached, worst row: agent {worst_agent:.3f}, "
          f"clients {worst_clients:.3f} (target <= 0.1); rows where swan-serve is slower "
          f"than mlx_lm.server: agent {slower_agent}, clients {slower_clients}; by the median "
          f"of paired ratios {slower_paired} (target 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

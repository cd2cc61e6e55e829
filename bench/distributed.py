"""Two ranks (`mlx.launch`, ring backend on loopback) against one process, same model, one run.

    .venv/bin/python bench/distributed.py            # writes a float Qwen3 fixture into bench/out/
    .venv/bin/python bench/distributed.py --quick    # fewer repeats
    .venv/bin/python bench/distributed.py --paper    # only the on-paper Qwen3.5-397B-A17B estimate

Each server in turn (never both at once) is started for real (the two ranks as mlx.launch
starts them, MLX_RANK and MLX_HOSTFILE, without the launcher's own process, whose output
loop polls: on 2 cores it would take CPU from the ranks), warmed up, then measured:
TTFT (streamed completions of a short prompt, median), single-stream decode tokens/s
(end-of-sequence banned, median), aggregate tokens/s of 4 concurrent clients, each process's
peak RSS (VmHWM) after the run and, for the ranks, the bytes rank 0 put into all_sum per
decode step (swan_distributed_all_sum_bytes_total in /metrics, which counts the sharded
layers' collectives, the sampled tokens and the control messages alike). On one machine
with 2 cores both ranks share the same cores and memory bus: this measures the overhead of
running in lockstep, not a speed-up. Both compute in float32.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from distributed_process import DirectRanks  # noqa: E402
from server_process import ServerProcess, eos_token_ids  # noqa: E402

OUT = REPO / "bench" / "out"
# ~38M parameters in the layers (151 MB in float32): the weights are most of a process's
# memory, and a step stays short on MLX's CPU matmul (~1 GFLOP/s here).
SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
             num_attention_heads=8, num_key_value_heads=4, head_dim=64)
ARGS = ("--served-model-name", "bench", "--dtype", "float32", "--max-concurrency", "4",
        "--prefix-cache-bytes", "0")
PROMPT = "Once upon a time, in a small town by the sea, there lived an old clockmaker"


def fixture_model() -> Path:
    path = OUT / "qwen3-dist-12x512"
    if not (path / "config.json").exists():
        from swan_serve.quant.fixtures import write_checkpoint

        write_checkpoint(path, "qwen3", seed=0, tokenizer="small", overrides=SHAPE,
                         overwrite=True)
    return path


# ---------------------------------------------------------------- one request


def stream(port: int, prompt: str, max_tokens: int, banned: dict[str, int]) -> list[float]:
    """Arrival times of each streamed chunk that carries text (first = TTFT), from send."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "logit_bias": banned}
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    arrivals = []
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event["choices"] and event["choices"][0]["text"]:
            arrivals.append(time.perf_counter() - started)
    conn.close()
    return arrivals


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(server: ServerProcess, banned: dict[str, int], repeats: int,
            decode_tokens: int) -> dict[str, float]:
    port = server.port
    for _ in range(2):
        stream(port, PROMPT, 8, banned)  # warm-up
    ttft = statistics.median(stream(port, f"{i} {PROMPT}", 1, banned)[0]
                             for i in range(repeats))
    speeds = []
    for i in range(repeats):
        arrivals = stream(port, f"{i}: {PROMPT}", decode_tokens, banned)
        speeds.append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
    # The same prompt twice, decoding 8 and then 8 + decode_tokens tokens: the difference
    # is decode steps only (the prefill and the prompt's turn are the same).
    sent = []
    for tokens in (8, 8 + decode_tokens):
        before = server.metrics()
        stream(port, f"bytes: {PROMPT}", tokens, banned)
        sent.append({k: server.metrics().get(k, 0) - before.get(k, 0) for k in before})
    clients = 4
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda i: stream(port, f"client {i} {PROMPT}", decode_tokens,
                                              banned), range(clients)))
    aggregate = sum(len(r) for r in runs) / (time.perf_counter() - started)
    def per_step(name: str) -> float:
        return (sent[1].get(name, 0) - sent[0].get(name, 0)) / decode_tokens

    return {
        "ttft": ttft, "decode": statistics.median(speeds), "aggregate": aggregate,
        "bytes_per_step": per_step("swan_distributed_all_sum_bytes_total"),
        "all_sums_per_step": per_step("swan_distributed_all_sums_total"),
    }


# ---------------------------------------------------------------- the table


def run(quick: bool) -> None:
    model = fixture_model()
    banned = {str(t): -100 for t in eos_token_ids(model)}
    repeats, decode_tokens = (3, 16) if quick else (5, 32)
    config = json.loads((model / "config.json").read_text())
    print(f"model: Qwen3 fixture, {config['num_hidden_layers']} layers, hidden "
          f"{config['hidden_size']}, float32; {repeats} repeats, {decode_tokens} decoded tokens")

    with ServerProcess(model, *ARGS) as single:
        one = measure(single, banned, repeats, decode_tokens)
        one_rss = [peak_rss(single.process.pid)]
    with tempfile.TemporaryDirectory() as folder, \
            DirectRanks(model, Path(folder), *ARGS, "--parallel", "tensor") as group:
        two = measure(group, banned, repeats, decode_tokens)
        two_rss = [peak_rss(group.rank_pid(rank)) for rank in (0, 1)]

    print()
    print("| | 1 process | 2 ranks (tensor) | 2 ranks / 1 |")
    print("|---|---|---|---|")
    print(f"| TTFT p50, short prompt | {one['ttft'] * 1e3:.1f} ms | "
          f"{two['ttft'] * 1e3:.1f} ms | {two['ttft'] / one['ttft']:.2f}x |")
    print(f"| decode, 1 stream | {one['decode']:.1f} tok/s | {two['decode']:.1f} tok/s | "
          f"{two['decode'] / one['decode']:.2f}x |")
    print(f"| aggregate, 4 clients | {one['aggregate']:.1f} tok/s | {two['aggregate']:.1f} "
          f"tok/s | {two['aggregate'] / one['aggregate']:.2f}x |")
    for rank, rss in enumerate(two_rss):
        print(f"| peak RSS, rank {rank} | {one_rss[0] / 2**20:.0f} MiB | {rss / 2**20:.0f} MiB | "
              f"{rss / one_rss[0]:.2f}x |")
    weights = _float32_weight_bytes(config)
    print(f"\nfloat32 weights in one process: {weights / 2**20:.0f} MiB "
          f"(each rank should hold about half of the layers' share)")
    layers = config["num_hidden_layers"] * 2 * config["hidden_size"] * 4
    print(f"all_sum bytes rank 0 sends per decode step (1 stream): "
          f"{two['bytes_per_step']:.0f} B in {two['all_sums_per_step']:.1f} collectives; "
          f"of which the sharded layers: {layers} B (2 per layer x hidden x 4 B), the rest "
          f"the sampled token and the turn's control message")


def _float32_weight_bytes(config: dict) -> int:
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    per_layer = h * q * 2 + h * kv * 2 + 3 * h * i
    embedding = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)
    return (per_layer * n + embedding) * 4


# ---------------------------------------------------------------- on paper


def paper() -> None:
    """Qwen3.5-397B-A17B at 4 bits on two 512 GB M3 Ultra Macs over Thunderbolt 5 (JACCL)."""
    total, active = 397e9, 17e9
    bits = 4.5  # 4-bit weights, group 64, bf16 scale + bias: 4 + 32/64
    bandwidth = 819e9  # M3 Ultra unified memory, bytes/s (Apple's figure)
    efficiency = (0.4, 0.7)  # share of peak bandwidth a decode step reaches (assumed)
    layers, hidden = 60, 4096
    reductions = 2 * layers  # tensor parallel: after attention and after the MoE, per layer
    link = 80e9 / 8  # Thunderbolt 5: 80 Gb/s each way
    latency = (10e-6, 30e-6)  # one small all_sum over JACCL incl. dispatch (assumed range)
    weights = total * bits / 8
    read = active * bits / 8 / 2  # each rank reads half of every active matrix
    compute = [read / (bandwidth * e) for e in efficiency]
    transfer = reductions * hidden * 2 / link  # bf16 activations, 1 token
    talk = [reductions * lat + transfer for lat in latency]
    # Fast end: best efficiency and lowest latency; slow end: the other two.
    fast, slow = compute[1] + talk[0], compute[0] + talk[1]
    print("Qwen3.5-397B-A17B, 4-bit (4.5 bpw), 2 x M3 Ultra 512 GB, tensor parallel over "
          "Thunderbolt 5 (JACCL), batch 1:")
    print(f"  weights {weights / 1e9:.0f} GB in all, {weights / 2e9:.0f} GB per Mac")
    print(f"  per token each Mac reads {read / 1e9:.2f} GB of weights: "
          f"{compute[1] * 1e3:.1f}-{compute[0] * 1e3:.1f} ms at "
          f"{efficiency[1]:.0%}-{efficiency[0]:.0%} of {bandwidth / 1e9:.0f} GB/s")
    print(f"  {reductions} all_sums of {hidden * 2 // 1024} KiB per token: "
          f"{transfer * 1e6:.0f} us on the wire + {latency[0] * 1e6:.0f}-{latency[1] * 1e6:.0f} "
          f"us each in latency = {talk[0] * 1e3:.1f}-{talk[1] * 1e3:.1f} ms")
    print(f"  decode: {1 / slow:.0f}-{1 / fast:.0f} tokens/s "
          f"(one Mac alone, same efficiency: {efficiency[0] * bandwidth / (2 * read):.0f}-"
          f"{efficiency[1] * bandwidth / (2 * read):.0f} tokens/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--paper", action="store_true", help="only the on-paper estimate")
    args = parser.parse_args()
    if not args.paper:
        run(args.quick)
        print()
    paper()


if __name__ == "__main__":
    main()

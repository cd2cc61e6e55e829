"""kill -9 while the prefix cache spills states to disk: only whole entries are left, a
restart indexes every one of them and skips (deletes) torn ones, and in the real server a
previously seen prompt reports cached_tokens > 0 after the restart."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from pathlib import Path

import mlx.core as mx
import openai
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache
from server_process import ServerProcess, eos_token_ids
from spill_worker import spill_forever, state_of, tokens_of

from swan_serve.server.prefix.prefix_store import DiskTier, file_name, read_header

KILLS = 20


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mlx.core", "mlx_lm", "spill_worker"])
    return context


def same_arrays(path: Path, tokens: list[int]) -> bool:
    got, expected = load_prompt_cache(str(path)), state_of(tokens)
    return all(mx.array_equal(a, b).item()
               for g, e in zip(got, expected, strict=True)
               for a, b in zip(tree_flatten(g.state), tree_flatten(e.state), strict=True)
               if isinstance(a, mx.array))


def test_kill_9_during_spills_leaves_only_whole_entries(forkserver, tmp_path: Path) -> None:
    folder = tmp_path / "prefixes"
    rng = random.Random(16)
    done: set[int] = set()  # spills that returned before the kill
    torn: set[int] = set()
    for kill in range(KILLS):
        receive, send = forkserver.Pipe(duplex=False)
        worker = forkserver.Process(target=spill_forever, args=(folder, kill * 10_000, send))
        worker.start()
        assert receive.poll(60) and receive.recv() == "ready"
        time.sleep(rng.uniform(0.0, 0.1))
        worker.kill()
        worker.join()
        while receive.poll(0):
            done.add(receive.recv())
        if kill % 5 == 4:  # something outside the server cuts a whole file short
            victim = rng.choice(sorted(done - torn))
            path = folder / file_name(tuple(tokens_of(victim)))
            path.write_bytes(path.read_bytes()[:-100])
            torn.add(victim)
        entries, skipped = DiskTier(folder, 1 << 30).scan()
        assert skipped == (1 if kill % 5 == 4 else 0)
        assert not list(folder.glob(".*")), "temporary files survive a restart"
        files = list(folder.glob("*.safetensors"))
        assert entries == len(files)
        numbers = {read_header(f)["tokens"][1] for f in files}
        # Every spill that returned is there, whole; at most the one each kill cut short
        # (renamed in place just before the kill) joined them.
        assert done - torn <= numbers
        for extra in numbers - done:
            first = extra // 10_000 * 10_000
            assert extra == max((n for n in done if n // 10_000 * 10_000 == first),
                                default=first - 1) + 1
        assert all(read_header(f) is not None for f in files)
    # Each entry holds exactly the arrays that were spilled.
    for path in folder.glob("*.safetensors"):
        tokens = list(read_header(path)["tokens"])
        assert same_arrays(path, tokens), path.name
    assert len(done) >= KILLS // 2  # the kills did land during spilling


def complete(client: openai.OpenAI, prompt: list[int], banned: list[int]) -> int:
    result = client.completions.create(model="tiny", prompt=prompt, max_tokens=4,
                                       temperature=0, logit_bias={str(t): -100 for t in banned})
    return result.usage.prompt_tokens_details.cached_tokens


def complete_ignoring_errors(client: openai.OpenAI, prompt: list[int], banned: list[int]
                             ) -> None:
    try:
        complete(client, prompt, banned)
    except openai.APIError:
        pass  # the server was killed under it


def test_real_server_killed_while_spilling_serves_a_seen_prompt_from_disk(
        tiny_checkpoint, tmp_path: Path) -> None:
    model = tiny_checkpoint("qwen3", tokenizer="small", dtype="float32")
    banned = eos_token_ids(model)
    rng = random.Random(3)
    # Memory holds about one 300-token state (1 KiB a token), so each request spills.
    args = ("--served-model-name", "tiny", "--dtype", "float32", "--prefix-cache-dir",
            str(tmp_path), "--prefix-cache-bytes", "400KB")
    seen = [rng.randrange(10, 1000) for _ in range(300)]
    for round_ in range(2):
        with ServerProcess(model, *args) as server:
            client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused",
                                   max_retries=0)
            on_disk = [f for f in tmp_path.glob("*/*.safetensors")]
            assert server.metrics()["swan_prefix_cache_disk_entries"] == len(on_disk)
            if round_ == 0:
                assert complete(client, seen, banned) == 0
            else:  # restarted after kill -9: the seen prompt comes from disk
                assert complete(client, seen, banned) == len(seen) - 1
                assert server.metrics()['swan_prefix_cache_tier_hits_total{tier="disk"}'] == 1
            for _ in range(3):  # new prompts push states out of memory: spills
                complete(client, [rng.randrange(10, 1000) for _ in range(300)], banned)
            # (the seen prompt's state, read back from disk, is not written again)
            assert server.wait_for_metric("swan_prefix_cache_spills_total",
                                          lambda v: v >= 2, 30) >= 2
            # kill -9 while another request's states push more out to disk
            late = [rng.randrange(10, 1000) for _ in range(300)]
            threading.Thread(target=complete_ignoring_errors, args=(client, late, banned),
                             daemon=True).start()
            time.sleep(rng.uniform(0.0, 0.3))
            server.process.kill()
            server.process.wait()

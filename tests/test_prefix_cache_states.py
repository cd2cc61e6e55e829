"""kv_state.py on real mlx_lm cache objects: which states can be cut back, that a hit copies
nothing and leaves the stored state as it was, and that a stored state owns exactly the
bytes it is counted for. Then PrefixReuse with a real model inside BatchGenerator."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, RotatingKVCache

from swan_serve.server.engine.model_loading import load_local_model
from swan_serve.server.prefix.kv_state import (
    detached,
    evaluate,
    is_trimmable,
    state_nbytes,
    view,
)
from swan_serve.server.prefix.prefix_reuse import PrefixReuse, cut, first_segment_end
from swan_serve.server.prefix.prefix_store import DiskTier, model_key


def kv_layer(cache, tokens: int, heads: int = 2, dim: int = 8):
    keys = mx.random.normal((1, heads, tokens, dim))
    cache.update_and_fetch(keys, keys + 1)
    return cache


def recurrent_layer(batch: int = 1) -> ArraysCache:
    layer = ArraysCache(2)
    layer[0] = mx.random.normal((batch, 3, 16))
    layer[1] = mx.random.normal((batch, 2, 4, 4))
    return layer


def test_which_states_can_be_trimmed() -> None:
    assert is_trimmable([kv_layer(KVCache(), 5)])
    assert is_trimmable([kv_layer(RotatingKVCache(max_size=8), 5)])
    # Once a sliding window has wrapped, old positions are overwritten: no way back.
    assert not is_trimmable([kv_layer(RotatingKVCache(max_size=8), 12)])
    assert not is_trimmable([recurrent_layer()])
    assert not is_trimmable([kv_layer(KVCache(), 5), recurrent_layer()])
    assert is_trimmable([CacheList(kv_layer(KVCache(), 5), kv_layer(KVCache(), 5))])
    assert not is_trimmable([CacheList(kv_layer(KVCache(), 5), recurrent_layer())])


def test_view_shares_arrays_and_forgets_only_in_the_copy() -> None:
    stored = detached([kv_layer(KVCache(), 10), kv_layer(RotatingKVCache(max_size=64), 10)])
    evaluate(stored)
    before = [mx.array(layer.keys) for layer in stored]
    trimmed = view(stored, trim=4)
    assert [layer.offset for layer in trimmed] == [6, 6]
    assert [layer.offset for layer in stored] == [10, 10]
    assert all(t.keys is s.keys for t, s in zip(trimmed, stored, strict=True))
    # What BatchGenerator does with it: merge into batch arrays, then keep writing there.
    merged = KVCache.merge([trimmed[0], kv_layer(KVCache(), 3)])
    merged.update_and_fetch(mx.ones((2, 2, 1, 8)), mx.ones((2, 2, 1, 8)))
    mx.eval(merged.keys)
    assert merged.size() == 7
    assert mx.array_equal(merged.keys[0, :, :6], before[0][0, :, :6]).item()
    window = RotatingKVCache.merge([trimmed[1], kv_layer(RotatingKVCache(max_size=64), 3)])
    assert window.size() == 6
    assert mx.array_equal(window.keys[0, :, :6], before[1][0, :, :6]).item()
    assert all(mx.array_equal(b, s.keys).item() for b, s in zip(before, stored, strict=True))


_OWNED_BYTES = """
import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache
from swan_serve.server.prefix.kv_state import detached, evaluate, state_nbytes

mx.synchronize()
baseline = mx.get_active_memory()
batch = ArraysCache(2)  # 64 rows: one is what a finished sequence leaves behind
batch[0] = mx.random.normal((64, 3, 16))
batch[1] = mx.random.normal((64, 2, 4, 4))
kv = KVCache()  # grown in steps of 256 positions: 512 allocated for 300
keys = mx.random.normal((1, 2, 300, 8))
kv.update_and_fetch(keys, keys + 1)
mx.eval(batch.cache, kv.keys, kv.values)
row = ArraysCache(2)
row.cache = [batch[0][3:4], batch[1][3:4]]
state = detached([row, kv])
evaluate(state)
del batch, kv, row, keys
mx.synchronize()
print(state_nbytes(state), mx.get_active_memory() - baseline)
"""


def test_detached_state_owns_exactly_its_bytes() -> None:
    # In a fresh process: what other tests left in this one (models, caches) is freed or
    # allocated at times of its own, and that is what get_active_memory would count.
    out = subprocess.run([sys.executable, "-c", _OWNED_BYTES], capture_output=True,
                         text=True, check=True).stdout.split()
    nbytes, held = int(out[0]), int(out[1])
    assert nbytes == (3 * 16 + 2 * 4 * 4 + 2 * 2 * 300 * 8) * 4
    # A view would keep the 64-row arrays (and the 512-position buffers) alive.
    assert nbytes <= held <= nbytes + 4096


def test_cut_and_first_segment() -> None:
    prompt = [5, 1, 9, 6, 1, 7, 7, 8]
    assert cut(prompt, 0, [2, 7]) == [[5, 1], [9, 6, 1, 7, 7], [8]]
    assert cut(prompt, 3, [2, 5, 8]) == [[6, 1], [7, 7, 8]]
    assert first_segment_end(prompt, frozenset({1})) == 2  # a second turn end follows
    assert first_segment_end([5, 1, 9, 9], frozenset({1})) is None  # one turn only


@pytest.fixture(scope="module", params=["qwen3", "qwen3_5_moe"])
def loaded(request, tiny_checkpoint):
    return load_local_model(Path(tiny_checkpoint(request.param, tokenizer="small")), "auto", None)


def run(model, reuse: PrefixReuse, prompts: list[list[int]], max_tokens: int = 6):
    """Greedy tokens and cached counts per prompt through BatchGenerator, planned and saved
    by `reuse`. A prompt told to wait for another's prefix runs in the next round."""
    out: dict[int, list[int]] = {}
    cached: dict[int, int] = {}
    while len(out) < len(prompts):
        generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=8,
                                   prefill_batch_size=8, prefill_step_size=64)
        plans = {i: reuse.plan(p) for i, p in enumerate(prompts) if i not in out}
        plans = {i: plan for i, plan in plans.items() if plan is not None}
        assert plans
        uids = generator.insert_segments([p.segments for p in plans.values()],
                                         max_tokens=[max_tokens] * len(plans),
                                         caches=[p.state for p in plans.values()],
                                         all_tokens=[p.all_tokens for p in plans.values()])
        index = dict(zip(uids, plans, strict=True))
        for i, plan in plans.items():
            out[i], cached[i] = [], plan.cached
        running = set(uids)
        while running:
            prompt_responses, responses = generator.next()
            ends = [r.uid for r in prompt_responses if r.end_of_segment and not r.end_of_prompt]
            for uid, (cache, tokens) in generator.extract_cache(ends).items():
                reuse.reached(plans[index[uid]], cache, list(tokens))
            for r in responses:
                out[index[r.uid]].append(r.token)
                if r.finish_reason:
                    running.discard(r.uid)
                    reuse.finished(plans[index[r.uid]], r.prompt_cache, list(r.all_tokens))
        generator.close()
    return [out[i] for i in range(len(prompts))], [cached[i] for i in range(len(prompts))]


def test_reuse_inside_batch_generator(loaded) -> None:
    end = 3  # a turn-end token for this test
    system = [7, 8, 9] * 30 + [end]
    first = system + [20, 21, 22, end, 30]
    second = system + [40, 41, end, 30]
    cold = PrefixReuse(0, turn_ends=[end])
    expected, cached = run(loaded.model, cold, [first, second])
    assert cached == [0, 0]

    reuse = PrefixReuse(64 << 20, turn_ends=[end])
    got, cached = run(loaded.model, reuse, [first])
    assert cached == [0]
    got2, cached2 = run(loaded.model, reuse, [second, first])
    assert got + got2 == [expected[0], expected[1], expected[0]]
    # Both at once into a cold cache: the second waits for the first's system segment.
    _, cached3 = run(loaded.model, PrefixReuse(64 << 20, turn_ends=[end]), [first, second])
    assert cached3 == [0, len(system)]
    # The system segment (ended by the first turn end) was saved on the way; the repeated
    # prompt starts one token before its end, for either kind of model.
    assert cached2 == [len(system), len(first) - 1]
    assert reuse.cache.bytes_held == sum(state_nbytes(e.state) for e in reuse.cache.entries())


def test_budget_holds_under_a_random_workload(loaded) -> None:
    rng = random.Random(3)
    heads = [[rng.randrange(10, 900) for _ in range(rng.randrange(5, 40))] + [3]
             for _ in range(3)]
    # Room for about three states of this model.
    probe = PrefixReuse(64 << 20, turn_ends=[3])
    run(loaded.model, probe, [heads[0] + [5, 5, 3, 5]])
    budget = 3 * max(e.nbytes for e in probe.cache.entries())
    evicted = []
    reuse = PrefixReuse(budget, turn_ends=[3], on_evict=evicted.append)
    hits = 0
    for _ in range(8):
        prompts = [rng.choice(heads) + [rng.randrange(10, 900)
                                        for _ in range(rng.randrange(1, 40))] + [3, 5]
                   for _ in range(rng.randrange(1, 4))]
        _, cached = run(loaded.model, reuse, prompts, max_tokens=rng.randrange(1, 4))
        hits += sum(c > 0 for c in cached)
        entries = reuse.cache.entries()
        # Counted from the arrays themselves, and never over the budget.
        assert reuse.cache.bytes_held == sum(state_nbytes(e.state) for e in entries) <= budget
    assert evicted and hits


def test_spilled_states_give_the_same_tokens_after_a_restart(loaded, tmp_path: Path) -> None:
    end = 3
    system = [11, 12, 13] * 20 + [end]
    prompt = system + [50, 51, 52, end, 30]
    reuse = PrefixReuse(64 << 20, turn_ends=[end])
    expected, _ = run(loaded.model, reuse, [prompt])
    folder = tmp_path / "saved"
    disk = DiskTier(folder, 64 << 20)
    assert disk.scan() == (0, 0)
    assert all(disk.spill(entry) for entry in reuse.cache.entries())
    assert not any(disk.spill(entry) for entry in reuse.cache.entries())  # written once
    (folder / ".cut-short.tmp.safetensors").write_bytes(b"partial")  # a write a crash cut

    restarted = PrefixReuse(64 << 20, turn_ends=[end])
    restarted.lower = DiskTier(folder, 64 << 20)
    assert restarted.lower.scan() == (len(reuse.cache), 0)
    got, cached = run(loaded.model, restarted, [prompt, system + [60, end, 30]])
    assert got[0] == expected[0]
    assert cached == [len(prompt) - 1, len(system)]
    # A trimmable state gives the second prompt its prefix by a cut; recurrent states are
    # kept (and read back) at each depth.
    trimmable = all(entry.trimmable for entry in reuse.cache.entries())
    assert restarted.lower.loads == (1 if trimmable else 2)
    assert not list(folder.glob(".*"))


def test_torn_entries_are_skipped_and_the_disk_budget_keeps_the_most_recent(
        loaded, tmp_path: Path) -> None:
    reuse = PrefixReuse(64 << 20, turn_ends=[3])
    prompts = [[20 + i] * 30 + [7, 8] for i in range(3)]
    run(loaded.model, reuse, prompts)
    disk = DiskTier(tmp_path, 64 << 20)
    disk.scan()
    for entry in reuse.cache.entries():
        disk.spill(entry)
    files = sorted(tmp_path.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == len(reuse.cache) >= 3
    whole = files[-1].read_bytes()
    files[0].write_bytes(whole[: len(whole) // 2])  # torn by something outside the server
    assert DiskTier(tmp_path, 64 << 20).scan() == (len(files) - 1, 1)
    assert not files[0].exists()
    one = DiskTier(tmp_path, files[-1].stat().st_size)
    assert one.scan() == (1, 0)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == [files[-1].name]


def test_model_key_names_the_files_and_dtype(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    key = model_key(tmp_path, "float32")
    assert key == model_key(tmp_path, "float32")
    assert key != model_key(tmp_path, "bfloat16")
    assert key != model_key(tmp_path, "float32", "8-bit/64")
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert key != model_key(tmp_path, "float32")


def test_a_disk_hit_is_read_only_when_faster_than_recomputing(loaded, tmp_path: Path) -> None:
    reuse = PrefixReuse(64 << 20, turn_ends=[3])
    prompt = [40] * 60 + [7, 8]
    run(loaded.model, reuse, [prompt])
    estimate = {"seconds": None}
    disk = DiskTier(tmp_path, 64 << 20, lambda _tokens, _context: estimate["seconds"])
    disk.scan()
    for entry in reuse.cache.entries():
        disk.spill(entry)
    limit = len(prompt) - 1
    assert disk.fetch(prompt, limit, have=0) is not None  # nothing known yet: read (measures)
    estimate["seconds"] = 1e-9  # recomputing costs nothing: reading cannot beat it
    assert disk.fetch(prompt, limit, have=0) is None
    estimate["seconds"] = 3600.0
    assert disk.fetch(prompt, limit, have=0) is not None
    assert disk.fetch(prompt, limit, have=limit) is None  # memory already gives as much
    assert disk.loads == 2

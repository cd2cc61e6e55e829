"""The prefill scheduler: the step-cost fit, the group-size choice, and the bookkeeping of
prompt progress read from a real BatchGenerator running a real tiny model."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator, PromptProcessingBatch

from swan_serve.server.engine.model_loading import load_local_model
from swan_serve.server.engine.prefill_schedule import PrefillScheduler, group_size
from swan_serve.server.engine.step_costs import PrefillWork, StepCosts, padded

# ------------------------------------------------------------ the fit


def synthetic_steps(coef: tuple[float, float, float, float], steps: int, seed: int = 0,
                    noise: float = 0.02):
    """(seconds, decode_rows, prefill rows) of steps whose time follows `coef`, with noise."""
    rng = random.Random(seed)
    for _ in range(steps):
        rows = rng.randint(0, 12)
        prefill = [PrefillWork(rng.randint(1, 200), rng.choice([0, 0, 500, 2000]))
                   for _ in range(rng.choice([0, 0, 1, 2, 4]))]
        tokens, pairs = padded(prefill)
        seconds = coef[0] + coef[1] * rows + coef[2] * tokens + coef[3] * pairs
        yield seconds * (1 + rng.uniform(-noise, noise)), rows, prefill


@pytest.mark.parametrize("coef", [
    (5e-3, 6e-4, 1.3e-4, 1.2e-7),  # attention-heavy: what MLX's CPU kernels look like
    (2e-2, 1e-4, 2e-5, 1e-10),  # a large fixed cost, cheap attention: a GPU and a big model
])
def test_fit_recovers_the_costs_it_was_given(coef) -> None:
    costs = StepCosts()
    for step in synthetic_steps(coef, 400):
        costs.observe(*step)
    assert costs.ready
    got = costs.coefficients()
    # Each term's contribution at a typical size, not the raw coefficient: a term too small
    # to matter at any size need not be found exactly.
    scale = np.array([1, 8, 200, 200 * 2100])
    np.testing.assert_allclose(got * scale, np.array(coef) * scale,
                               atol=0.05 * float(np.dot(coef, scale)))
    work = PrefillWork(40, 2000)
    expected = coef[2] * work.tokens + coef[3] * work.pairs
    assert costs.prefill_cost(work) == pytest.approx(expected, rel=0.1)
    assert costs.step_overhead(8) == pytest.approx(coef[0] + 8 * coef[1], rel=0.1)


def test_fit_is_never_negative_and_copes_with_a_missing_term() -> None:
    costs = StepCosts()
    # No attention context ever (pairs grow with tokens only) and no fixed cost at all.
    for tokens in [10, 20, 40, 80, 160] * 4:
        costs.observe(1e-4 * tokens, 0, [PrefillWork(tokens, 0)])
    assert (costs.coefficients() >= 0).all()
    assert costs.prefill_cost(PrefillWork(100, 0)) == pytest.approx(1e-2, rel=0.05)


def test_fit_waits_for_prefill_steps_before_it_is_trusted() -> None:
    costs = StepCosts()
    for _ in range(50):
        costs.observe(0.01, 4, [])  # decode-only steps say nothing about prefill
    assert not costs.ready
    for _ in range(3):
        costs.observe(0.05, 4, [PrefillWork(100, 0)])
    assert costs.ready


def test_padding_counts_every_row_as_the_largest() -> None:
    rows = [PrefillWork(10, 100), PrefillWork(40, 0), PrefillWork(0, 5000)]
    assert padded(rows) == (80.0, 2 * 40 * (100 + 41 / 2))
    assert padded([]) == (0.0, 0.0)


# ------------------------------------------------------------ the choice


def test_group_size_by_hand() -> None:
    # Expensive prompts, cheap steps: one at a time finishes at 11 and 22 (mean 16.5);
    # together both finish at 21.
    assert group_size([10, 10], overhead=1, cap=8) == 1
    # Cheap prompts, expensive steps: apart 11 and 22, together 12.
    assert group_size([1, 1], overhead=10, cap=8) == 2
    # A long prompt first: grouping it with the short ones makes them all wait for it
    # (g=1: 105, 111, 117, 123; g=2: 205, 212; g=4: 405).
    assert group_size([100, 1, 1, 1], overhead=5, cap=4) == 1
    assert group_size([1] * 20, overhead=100, cap=8) == 8  # never past the cap
    assert group_size([], overhead=1, cap=8) == 0


def test_scheduler_batches_everything_until_costs_are_known() -> None:
    schedule = PrefillScheduler(cap=4, chunk=512)
    waiting = [PrefillWork(2000, 0)] * 6
    assert schedule.how_many(waiting, decode_rows=0) == 4
    for step in synthetic_steps((5e-3, 6e-4, 1.3e-4, 1.2e-7), 50):
        schedule.costs.observe(*step)
    # Known costs: prompts this long go one at a time, short ones together.
    assert schedule.how_many(waiting, decode_rows=0) == 1
    assert schedule.how_many([PrefillWork(3, 0)] * 6, decode_rows=8) == 4


def test_short_prompts_join_a_long_prefill_instead_of_waiting_for_it() -> None:
    schedule = PrefillScheduler(cap=3, chunk=100)
    schedule.started(0, cached=0, prompt_length=1000)  # ten chunks to go
    assert schedule.busy and schedule.may_start()
    waiting = [PrefillWork(50, 0), PrefillWork(80, 900), PrefillWork(500, 0), PrefillWork(9, 0)]
    # The two short ones at the head of the queue; the long third keeps its place (and the
    # short fourth behind it); never more than the cap with the group.
    assert schedule.how_many(waiting, decode_rows=0) == 2
    schedule.started(1, cached=0, prompt_length=51)
    assert schedule.how_many(waiting[1:], decode_rows=0) == 1
    # Near its end the long prompt no longer lets others in: they wait for the next group.
    progress = PromptProcessingBatch.Response(0, (800, 1000), True, False)
    schedule.step_done(0.1, 0, [progress])
    assert schedule.busy and not schedule.may_start()
    assert schedule.how_many(waiting, decode_rows=0) == 0


# ------------------------------------------------------------ with a real model


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_local_model(Path(tiny_checkpoint("qwen3", tokenizer="small")), "auto", None).model


def test_progress_is_read_as_the_tokens_each_step_computed(model) -> None:
    """Drives BatchGenerator as the server does (the next group once the last one has moved
    to decoding) and checks what the scheduler reads from it against the prompts: every
    prompt token but the last is counted once, in chunks of at most prefill_step_size, each
    over the tokens before it; `busy` holds exactly until the group is decoding."""
    schedule = PrefillScheduler(cap=4, chunk=32)
    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=4,
                               prefill_batch_size=4, prefill_step_size=32)
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 200) for _ in range(n)] for n in (1, 7, 50, 90, 3, 33)]
    chunks: dict[int, list[PrefillWork]] = {}
    waiting, running, decoding = list(range(len(prompts))), set(), set()
    length: dict[int, int] = {}
    while waiting or running:
        if waiting and not schedule.busy:
            take, waiting = waiting[:2], waiting[2:]
            uids = generator.insert([prompts[i] for i in take], max_tokens=[3] * len(take))
            for uid, i in zip(uids, take, strict=True):
                schedule.started(uid, 0, len(prompts[i]))
                length[uid], chunks[uid] = len(prompts[i]), []
                running.add(uid)
        started = time.monotonic()
        prompt_responses, responses = generator.next()
        read = schedule.step_done(time.monotonic() - started, len(responses), prompt_responses)
        for uid, work in read.items():
            chunks[uid].append(work)
        decoding |= {r.uid for r in prompt_responses if r.end_of_prompt}
        assert schedule.busy == bool(running - decoding)
        for r in responses:
            if r.finish_reason:
                running.discard(r.uid)
                schedule.ended(r.uid)
    generator.close()
    for uid, read in chunks.items():
        assert sum(w.tokens for w in read) == length[uid] - 1
        assert all(0 < w.tokens <= 32 for w in read)
        assert [w.context for w in read] == [sum(w.tokens for w in read[:i])
                                             for i in range(len(read))]
    assert schedule.costs.ready
    assert (schedule.costs.coefficients() >= 0).all()

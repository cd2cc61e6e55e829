"""quant/evaluate.py: KL, perplexity and top-1 agreement of real converted models."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from swan_serve.quant.allocate import uniform_plan
from swan_serve.quant.convert import convert
from swan_serve.quant.evaluate import EvalError, compare, evaluate, load_model, windows
from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes
from swan_serve.quant.sources.checkpoint import open_checkpoint

TEXT = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n"
) * 6


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory):
    src = tiny_checkpoint("qwen3", tokenizer="small")
    ckpt = open_checkpoint(src)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    out = {}
    for bits in (8, 3):
        out[bits] = tmp_path_factory.mktemp(f"q{bits}") / "m"
        convert(src, out[bits], uniform_plan(name_map, bits, 64), method="rtn", progress=False)
    return src, out


def test_a_model_against_itself_is_perfect(models):
    src, _ = models
    result = evaluate(src, src, TEXT, seq_len=32, progress=False)
    assert result.kl_mean == 0.0 and result.kl_p99 == 0.0 and result.top1 == 1.0
    assert result.ppl_ref == result.ppl_quant and math.isfinite(result.ppl_ref)
    assert result.tokens % 32 == 0 and result.tokens >= 64


def test_fewer_bits_are_further_away(models):
    src, quant = models
    ref, tokenizer = load_model(src)
    data = windows(tokenizer, TEXT, seq_len=32, max_tokens=10_000)
    results = compare(ref, {b: load_model(p)[0] for b, p in quant.items()}, data,
                      batch_size=2, progress=False)
    assert 0 < results[8].kl_mean < results[3].kl_mean
    assert results[3].kl_p99 >= results[3].kl_mean
    assert results[8].top1 > results[3].top1
    assert results[8].ppl_ref == results[3].ppl_ref  # one reference pass serves both
    # Batching does not change the figures.
    single = compare(ref, {3: load_model(quant[3])[0]}, data, batch_size=1, progress=False)[3]
    assert np.isclose(single.kl_mean, results[3].kl_mean, rtol=1e-5)


def test_too_little_text_is_a_clear_error(models):
    src, _ = models
    _, tokenizer = load_model(src)
    with pytest.raises(EvalError, match="tokens"):
        windows(tokenizer, "def f(): pass", seq_len=256, max_tokens=1000)


def test_models_with_different_vocabularies_are_refused(models, tiny_checkpoint):
    src, _ = models
    other = tiny_checkpoint("qwen3", tokenizer="small", overrides={"vocab_size": 1088})
    with pytest.raises(EvalError, match="not the same model"):
        evaluate(src, other, TEXT, seq_len=32, progress=False)


def test_cli_prints_a_table(models, tmp_path):
    src, quant = models
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    run = subprocess.run(
        [sys.executable, "-m", "swan_serve.quant.cli", "eval", str(src), str(quant[8]),
         "--text", str(text), "--seq-len", "32"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "KL mean" in run.stdout and "top-1" in run.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "swan_serve.quant.cli", "eval", str(src), str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1

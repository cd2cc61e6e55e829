"""The numpy model streamed from its checkpoint (NpModel.stream) against the whole
model through mlx_lm (NpModel.load): same logits, same generation, same measure,
while it reads a layer at a time and the head in bounded row blocks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from swan_serve import DEMO_MODEL_DIR
from swan_serve.quant.affine import quantize_dequantize
from swan_serve.quant.analyze import analyze_checkpoint
from swan_serve.quant.moments import MomentOptions
from swan_serve.quant.npmodel import NpModel
from swan_serve.quant.npweights import EMBED, StreamedWeights
from swan_serve.quant.objective import measure
from swan_serve.quant.recipe import load_recipe

STORIES = Path(os.environ.get("SWAN_SHARED_DIR", "/work/shared")) / "models" / "stories260K"
MODELS = [
    pytest.param(DEMO_MODEL_DIR, id="demo"),
    pytest.param(STORIES, id="stories260K", marks=pytest.mark.skipif(
        not (STORIES / "config.json").is_file(), reason=f"{STORIES} absent (SWAN_SHARED_DIR)")),
]
TEXTS = ("def loads(s):\n    return json.loads(s)\n", "Once upon a time", "import os\n")


class Recorded(StreamedWeights):
    """Streamed weights that note what each read asked for (name, elements)."""

    def __init__(self, weights: StreamedWeights):
        super().__init__(weights.ckpt, weights.tied)
        self.reads: list[tuple[str, int]] = []

    def _read(self, key):
        out = super()._read(key)
        self.reads.append((key, out.size))
        return out

    def _read_rows(self, key, rows):
        out = super()._read_rows(key, rows)
        self.reads.append((key, out.size))
        return out


def _batch(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded token ids of TEXTS and their valid mask."""
    ids = [tokenizer.encode(t) for t in TEXTS]
    longest = max(map(len, ids))
    tokens = np.zeros((len(ids), longest), np.int64)
    valid = np.zeros(tokens.shape, bool)
    for i, seq in enumerate(ids):
        tokens[i, longest - len(seq):], valid[i, longest - len(seq):] = seq, True
    return tokens, valid


@pytest.mark.parametrize("src", MODELS)
def test_streamed_logits_equal_the_whole_model(src):
    whole, tokenizer = NpModel.load(src)
    streamed, _ = NpModel.stream(src)
    streamed.weights.block_elements = 1000  # many head blocks, even on a tiny model
    tokens, valid = _batch(tokenizer)
    expected = whole.forward(tokens, valid=valid)
    got = streamed.forward(tokens, valid=valid)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    cache = streamed.new_cache()  # prefill + one decode step, last position only
    streamed.forward(tokens[:, :-1], cache, valid[:, :-1], logits="none")
    last = streamed.forward(tokens[:, -1:], cache, valid, logits="last")
    assert np.abs(last[:, 0] - expected[:, -1]).max() <= 1e-4 * np.abs(expected).max()
    prompts = [tokenizer.encode(t) for t in TEXTS]
    assert streamed.generate(prompts, 6, 0.7, 1, set()) == whole.generate(prompts, 6, 0.7, 1, set())


def test_one_forward_reads_layer_by_layer_and_the_head_in_blocks():
    streamed, tokenizer = NpModel.stream(DEMO_MODEL_DIR)
    weights = streamed.weights = Recorded(streamed.weights)
    weights.block_elements = 256 * 512  # the demo head: 4096 x 256 -> 8 blocks
    tokens, valid = _batch(tokenizer)
    streamed.forward(tokens, valid=valid)
    layers = [int(k.split(".")[2]) for k, _ in weights.reads if k.startswith("model.layers.")]
    assert layers == sorted(layers) and set(layers) == set(range(streamed.shape.layers))
    embed = [n for k, n in weights.reads if k == EMBED]
    vocab, hidden = weights.shape(EMBED)
    # the lookup reads only the distinct tokens; the tied head reads all rows, 8 blocks
    assert embed[0] == len(np.unique(tokens)) * hidden
    assert embed[1:] == [512 * hidden] * 8
    every = {i.name for i in weights.ckpt.tensors}
    assert {k for k, _ in weights.reads} == every  # each weight read, nothing skipped
    weights.reads.clear()
    streamed.forward(tokens, valid=valid, logits="none")  # a hook pass skips the head
    assert [n for k, n in weights.reads if k == EMBED] == [len(np.unique(tokens)) * hidden]


@pytest.mark.parametrize("src", MODELS)
def test_overrides_equal_swapping_weights_in_the_whole_model(src):
    """A read-time override (the calibration probe) = the old in-place swap, also for
    the tied embedding, which is read by rows (lookup) and by blocks (head)."""
    whole, tokenizer = NpModel.load(src)
    streamed, _ = NpModel.stream(src)
    streamed.weights.block_elements = 1000
    tokens, valid = _batch(tokenizer)
    plain = streamed.forward(tokens, valid=valid)
    swapped = ["model.layers.1.mlp.up_proj.weight", EMBED]

    def probe(w):
        return quantize_dequantize(w, 2, 32)

    for key in swapped:
        whole.weights.w[key] = probe(whole.weights.w[key])
        streamed.overrides[key] = probe
    expected = whole.forward(tokens, valid=valid)
    got = streamed.forward(tokens, valid=valid)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.abs(plain - got).max() > 1e-3 * np.abs(plain).max()  # the probe changed it
    streamed.overrides.clear()  # and back: the checkpoint itself was never touched
    assert np.array_equal(streamed.forward(tokens, valid=valid), plain)


def test_measure_streamed_gives_the_sensitivity_of_the_whole_model():
    manifest = analyze_checkpoint(DEMO_MODEL_DIR, progress=False)
    recipe, options = load_recipe("budget"), MomentOptions(max_new_tokens=8)
    whole, whole_moments = measure(DEMO_MODEL_DIR, manifest, recipe, options=options,
                                   model_and_tokenizer=NpModel.load(DEMO_MODEL_DIR))
    streamed, moments = measure(DEMO_MODEL_DIR, manifest, recipe, options=options)
    assert streamed.errors == whole.errors and streamed.class_gain == whole.class_gain
    assert streamed.class_gain and sorted(moments) == sorted(whole_moments)
    assert all(np.array_equal(moments[k], whole_moments[k]) for k in moments)


def test_stream_refuses_an_architecture_it_cannot_run(tiny_checkpoint):
    src = tiny_checkpoint("qwen3_moe")
    with pytest.raises(ValueError, match="numpy model runs"):
        NpModel.stream(src)


def test_qwen2_biases_match_mlx_lm(tmp_path):
    """Qwen2's q/k/v projections carry biases: the numpy model must add them, streamed
    and whole, exactly as mlx_lm does."""
    import json
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    config = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-6, "vocab_size": 512, "rope_theta": 10000.0,
              "tie_word_embeddings": True, "max_position_embeddings": 256}
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    # visible biases: mlx_lm initialises them to zero
    model.update({"model": {"layers": [
        {"self_attn": {n: {"bias": mx.random.normal((64 if n == "q_proj" else 32,))}
                       for n in ("q_proj", "k_proj", "v_proj")}} for _ in range(2)]}})
    mx.eval(model.parameters())
    mx.save_safetensors(str(tmp_path / "model.safetensors"),
                        dict(tree_flatten(model.parameters())))
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(DEMO_MODEL_DIR) / name, tmp_path / name)
    tokens = np.array([[5, 17, 300, 42, 7, 99]])
    expected = np.array(model(mx.array(tokens)).astype(mx.float32))
    streamed, _ = NpModel.stream(tmp_path)
    whole, _ = NpModel.load(tmp_path)
    for np_model in (streamed, whole):
        np.testing.assert_allclose(np_model.forward(tokens), expected, rtol=1e-4, atol=1e-4)

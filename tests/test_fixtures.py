"""The fixture factory writes real checkpoints: mlx_lm loads and runs every architecture,
writes are deterministic, streamed, sharded like Hugging Face and atomic, and the
full-shape layouts match the real Qwen indexes."""

from __future__ import annotations

import filecmp
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from swan_serve.quant.fixtures import ARCHITECTURES, tensor_specs, write_checkpoint
from swan_serve.quant.fixtures.configs import read_config
from swan_serve.quant.fixtures.random_weights import to_dtype_bytes
from swan_serve.quant.fixtures.safetensors_stream import iter_header
from swan_serve.quant.safetensors_out import shard_names

MOE_ARCHITECTURES = {"qwen3_moe", "qwen3_5_moe"}


def load_numpy(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder as float32 numpy (via mlx, which reads bf16)."""
    arrays = {}
    for file in sorted(path.glob("model*.safetensors")):
        for name, value in mx.load(str(file)).items():
            arrays[name] = np.array(value.astype(mx.float32))
    return arrays


def excess_kurtosis(x: np.ndarray) -> float:
    x = x.astype(np.float64).ravel()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2 - 3.0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mlx_lm_loads_and_generates(tiny_checkpoint, arch: str) -> None:
    path = tiny_checkpoint(arch)
    model, tokenizer = mlx_lm.load(str(path))  # strict: every parameter present, no extras
    if arch in MOE_ARCHITECTURES and mx.default_device() == mx.cpu:
        # mlx's CPU GatherMM (unquantized expert matmul) only supports float32.
        model.set_dtype(mx.float32)
    vocab = json.loads((path / "config.json").read_text())
    vocab = vocab.get("text_config", vocab)["vocab_size"]

    prompt = tokenizer.encode("The quick brown fox")
    logits = model(mx.array([prompt]))
    assert logits.shape == (1, len(prompt), vocab)
    assert bool(mx.all(mx.isfinite(logits)))

    tokens = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=4)]
    assert 0 < len(tokens) <= 4
    assert all(0 <= t < vocab for t in tokens)


def test_qwen3_5_moe_uses_official_layout_and_conventions(tiny_checkpoint) -> None:
    path = tiny_checkpoint("qwen3_5_moe")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe"
    text = config["text_config"]
    assert text["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]

    shapes = {name: entry["shape"] for name, entry in iter_header(path / "model.safetensors")}
    layer0, layer3 = "model.language_model.layers.0", "model.language_model.layers.3"
    n_experts, inter, hidden = text["num_experts"], text["moe_intermediate_size"], 128
    assert shapes[f"{layer0}.mlp.experts.gate_up_proj"] == [n_experts, 2 * inter, hidden]
    assert shapes[f"{layer0}.mlp.experts.down_proj"] == [n_experts, hidden, inter]
    assert shapes[f"{layer0}.mlp.shared_expert_gate.weight"] == [1, hidden]
    assert shapes[f"{layer0}.linear_attn.conv1d.weight"][1] == 1  # PyTorch [C, 1, K]
    assert f"{layer3}.self_attn.q_norm.weight" in shapes
    assert not any(".experts.0." in name for name in shapes)

    # mlx_lm's sanitize must have recognised the Hugging Face layout: it adds 1 to
    # the (1 + w) RMSNorm weights, but not to the gated norm inside linear_attn.
    model, _ = mlx_lm.load(str(path))
    layers = model.language_model.model.layers
    assert abs(float(layers[0].input_layernorm.weight.mean()) - 1.0) < 0.1
    assert abs(float(layers[3].self_attn.q_norm.weight.mean()) - 1.0) < 0.1
    assert abs(float(layers[0].linear_attn.norm.weight.mean()) - 1.0) < 0.1
    assert layers[0].linear_attn.conv1d.weight.shape[-1] == 1
    assert layers[0].linear_attn.A_log.dtype == mx.float32


def test_same_arguments_give_identical_files(tmp_path: Path) -> None:
    kwargs = {"tokenizer": "small", "shards": 2}
    first = write_checkpoint(tmp_path / "a", "qwen3_moe", **kwargs)
    second = write_checkpoint(tmp_path / "b", "qwen3_moe", **kwargs)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(first, second, names, shallow=False)
    assert (mismatch, errors) == ([], [])

    other = write_checkpoint(tmp_path / "c", "qwen3_moe", seed=1, **kwargs)
    shard = "model-00001-of-00002.safetensors"
    assert not filecmp.cmp(first / shard, other / shard, shallow=False)


def test_sharded_checkpoint_has_a_correct_index(tmp_path: Path) -> None:
    single = write_checkpoint(tmp_path / "single", "qwen3", tokenizer="small")
    sharded = write_checkpoint(tmp_path / "sharded", "qwen3", tokenizer="small", shards=3)
    assert not (single / "model.safetensors.index.json").exists()

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("model*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    data_bytes = 0
    for file in files:
        entries = dict(iter_header(sharded / file))
        assert entries, f"{file} is empty"
        assert {n for n, f in index["weight_map"].items() if f == file} == set(entries)
        ranges = sorted(tuple(e["data_offsets"]) for e in entries.values())
        assert ranges[0][0] == 0
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        data_bytes += ranges[-1][1]
    assert index["metadata"]["total_size"] == data_bytes

    # Sharding moves tensors between files but never changes their values.
    ones, threes = load_numpy(single), load_numpy(sharded)
    assert ones.keys() == threes.keys()
    assert all(np.array_equal(ones[k], threes[k]) for k in ones)
    mlx_lm.load(str(sharded))


def test_weights_are_heavy_tailed_and_scaled(tiny_checkpoint) -> None:
    weights = load_numpy(tiny_checkpoint("qwen3", tokenizer="small"))
    gate = weights["model.layers.0.mlp.gate_proj.weight"]  # [384, 128]
    assert excess_kurtosis(gate) > 1.0  # a Gaussian gives ~0
    assert 0.5 < gate.std() * np.sqrt(gate.shape[1]) < 2.5  # ~1/sqrt(fan_in)
    column_rms = np.sqrt((gate**2).mean(axis=0))
    assert column_rms.max() > 2.0 * np.median(column_rms)  # outlier input channels
    row_rms = np.sqrt((gate**2).mean(axis=1))
    assert row_rms.max() > 1.3 * row_rms.min()  # rows differ in scale

    norm = weights["model.layers.0.input_layernorm.weight"]
    assert abs(norm.mean() - 1.0) < 0.05 and norm.std() > 0
    kurtoses = [excess_kurtosis(w) for n, w in weights.items() if w.ndim == 2]
    assert max(kurtoses) > 1.5 * min(kurtoses)  # tensors differ from each other


def test_bfloat16_rounding_matches_mlx() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-6, 6, 10_000),
            np.float32([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 0.0, -0.0]),  # ties
        ]
    ).astype(np.float32)
    ours = to_dtype_bytes(values, "bfloat16")
    theirs = np.array(mx.array(values).astype(mx.bfloat16).view(mx.uint16))
    np.testing.assert_array_equal(ours, theirs)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        write_checkpoint(tmp_path / "m", "llama", tokenizer="small", overrides={"vocab_size": 8})
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_checkpoint(tmp_path / "m", "llama", tokenizer="small")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["keep.txt"]
    write_checkpoint(tmp_path / "m", "llama", tokenizer="small", overwrite=True)
    assert (tmp_path / "m" / "config.json").exists() and not (tmp_path / "m" / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_tokenizer_choice_without_shared_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SWAN_SHARED_DIR", str(tmp_path / "no-shared"))
    with pytest.raises(FileNotFoundError, match="Qwen3 tokenizer"):
        write_checkpoint(tmp_path / "real", "qwen3", tokenizer="qwen3")
    assert not (tmp_path / "real").exists()

    # "auto" falls back to the small tokenizer: small vocabulary, untied lm_head.
    path = write_checkpoint(tmp_path / "auto", "qwen3")
    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    tokens = json.loads((path / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in tokens}
    assert config["vocab_size"] == 1024 and config["tie_word_embeddings"] is False
    assert "lm_head.weight" in dict(iter_header(path / "model.safetensors"))
    assert generation["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert config["eos_token_id"] == ids["<|im_end|>"]


def test_killed_write_leaves_no_complete_looking_folder(tmp_path: Path) -> None:
    out = tmp_path / "big"
    big = ["--set", "hidden_size=1024", "--set", "intermediate_size=4096", "--set", "head_dim=128"]
    command = [sys.executable, "-m", "swan_serve.quant.fixtures", "qwen3", str(out)]
    process = subprocess.Popen(
        [*command, "--tokenizer", "small", "--set", "num_hidden_layers=24", *big],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size > 0 for p in tmp_path.glob(".big.partial-*/model*")):
            assert process.poll() is None, "the write finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
    assert not out.exists()


def test_cli_writes_and_reports_errors_in_one_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "swan_serve.quant.fixtures"]
    ok = subprocess.run(
        [*command, "llama", str(tmp_path / "m"), "--tokenizer", "small", "--seed", "3",
         "--set", "num_hidden_layers=1", "--set", "rope_theta=10000.0"],
        capture_output=True, text=True, check=False,
    )
    assert ok.returncode == 0, ok.stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["rope_theta"]) == (1, 10000.0)

    bad = subprocess.run(
        [*command, "qwen3", str(tmp_path / "n"), "--config", str(tmp_path / "missing.json")],
        capture_output=True, text=True, check=False,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")


# Full-shape layouts against the real Qwen indexes (../shared/models, no weights).


def _real_index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize(
    ("folder", "arch"), [("Qwen3-8B", "qwen3"), ("Qwen3-30B-A3B", "qwen3_moe")]
)
def test_full_shape_layout_matches_real_index(shared_models_dir: Path, folder: str, arch: str):
    real = _real_index(shared_models_dir / folder)
    specs = tensor_specs(arch, read_config(shared_models_dir / folder / "config.json"))
    assert {s.name for s in specs} == set(real["weight_map"])
    assert sum(s.nbytes for s in specs) == real["metadata"]["total_size"]


def test_qwen3_5_layout_matches_real_names(shared_models_dir: Path) -> None:
    folder = shared_models_dir / "Qwen3.5-35B-A3B-REAP-25B-derivative"
    real = _real_index(folder)
    specs = tensor_specs("qwen3_5_moe", read_config(folder / "config.json"))
    # The derivative stores one tensor per expert; official checkpoints stack them.
    stacked = set()
    for name in real["weight_map"]:
        match = re.fullmatch(r"(.*\.mlp\.experts)\.\d+\.(\w+)_proj\.weight", name)
        if match:
            kind = "down_proj" if match[2] == "down" else "gate_up_proj"
            stacked.add(f"{match[1]}.{kind}")
        else:
            stacked.add(name)
    assert {s.name for s in specs} == stacked
    assert sum(s.numel for s in specs) == real["metadata"]["total_parameters"]


def test_full_width_write_follows_real_shapes_and_shards(
    shared_models_dir: Path, tmp_path: Path
) -> None:
    config = shared_models_dir / "Qwen3-8B" / "config.json"
    real = _real_index(shared_models_dir / "Qwen3-8B")
    path = write_checkpoint(
        tmp_path / "q8b", "qwen3", config=config, tokenizer="small",
        overrides={"num_hidden_layers": 1, "vocab_size": 1024},
    )
    headers = {
        name: (entry["shape"], file.name)
        for file in sorted(path.glob("model*.safetensors"))
        for name, entry in iter_header(file)
    }
    p = "model.layers.0"
    assert headers[f"{p}.self_attn.q_proj.weight"][0] == [4096, 4096]
    assert headers[f"{p}.self_attn.k_proj.weight"][0] == [1024, 4096]
    assert headers[f"{p}.self_attn.q_norm.weight"][0] == [128]
    assert headers[f"{p}.mlp.down_proj.weight"][0] == [4096, 12288]
    assert headers["lm_head.weight"][0] == [1024, 4096]
    # Split like the real index, its shards that hold none of these tensors dropped.
    real_map = real["weight_map"]
    real_files = sorted({real_map[name] for name in headers})
    assert len(real_files) == 3  # shards 1 (embeddings, layer 0), 4 (norm), 5 (lm_head)
    for name, (_, file) in headers.items():
        assert file == shard_names(len(real_files))[real_files.index(real_map[name])]
    written = json.loads((path / "config.json").read_text())
    assert written["num_hidden_layers"] == 1 and written["intermediate_size"] == 12288

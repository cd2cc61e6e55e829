"""swan-quant validate: per-tensor cosine of a conversion against its float source or
another MLX checkpoint, on real fixture checkpoints (Qwen3.5-MoE: linear attention,
routed and shared experts, routers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from swan_serve.quant.allocate import uniform_plan
from swan_serve.quant.cache import ENV_CACHE_DIR
from swan_serve.quant.cli import main
from swan_serve.quant.convert import convert
from swan_serve.quant.fixtures.gguf_writer import write_gguf
from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes
from swan_serve.quant.sources.checkpoint import open_checkpoint
from swan_serve.quant.validate import group_of, validate

LINEAR_ATTN_GROUPS = {f"linear_attn {g}" for g in
                      ("qkv", "z", "a", "b", "out", "conv1d", "A_log", "dt_bias")}
Z_PROJ = "language_model.model.layers.1.linear_attn.in_proj_z"


def _convert(src: Path, out: Path, bits: int) -> Path:
    ckpt = open_checkpoint(src)
    plan = uniform_plan(build_name_map(ckpt.config, checkpoint_shapes(ckpt)), bits, 64)
    convert(src, out, plan, method="rtn", progress=False)
    return out


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    src = tiny_checkpoint("qwen3_5_moe", tokenizer="small")
    return src, _convert(src, tmp_path_factory.mktemp("q8") / "model", 8)


def _rewrite(model: Path, change) -> None:
    """Load the (single-shard) checkpoint's tensors, let `change` edit the dict, save."""
    (shard,) = sorted(model.glob("*.safetensors"))
    tensors = dict(mx.load(str(shard)))
    change(tensors)
    mx.save_safetensors(str(shard), tensors, metadata={"format": "mlx"})
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: shard.name for k in tensors}
    index.write_text(json.dumps(data))


def _copy(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "copy"))


def test_a_conversion_passes_against_its_float_source(pair, tmp_path, capsys):
    src, quant = pair
    assert main(["validate", str(quant), "--reference", str(src), "--no-progress",
                 "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    groups = {g["group"]: g for g in report["groups"]}
    assert LINEAR_ATTN_GROUPS <= set(groups)
    assert {"attention", "routed experts", "shared experts", "routers", "embeddings", "lm_head",
            "norms"} <= set(groups)
    for name, g in groups.items():
        assert g["passed"], name
        assert name in table
    by_key = {t["key"]: t for t in report["tensors"]}
    for key, t in by_key.items():
        if t["both_float"]:  # norms, conv1d, A_log, dt_bias: untouched by the conversion
            assert abs(t["cosine"] - 1.0) < 1e-9, key
        else:  # 8-bit affine on random weights
            assert 0.9995 < t["cosine"] < 1.0, key
    assert by_key[f"{Z_PROJ}.weight"]["quant"] == "8b/g64"
    assert report["passed"] and not report["failed"]
    assert not report["only_in_quant"] and not report["only_in_reference"]


def test_one_corrupted_tensor_fails_and_is_named(pair, tmp_path, capsys):
    src, quant = pair
    bad = _copy(quant, tmp_path)

    def corrupt(t: dict) -> None:  # random codes in one packed weight
        w = t[f"{Z_PROJ}.weight"]
        rng = np.random.default_rng(0)
        t[f"{Z_PROJ}.weight"] = mx.array(rng.integers(0, 2**32, w.shape, dtype=np.uint32))

    _rewrite(bad, corrupt)
    assert main(["validate", str(bad), "--reference", str(src), "--no-progress",
                 "--json", "-"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # the JSON alone on stdout, the table on stderr
    assert report["failed"] == [f"{Z_PROJ}.weight"]
    assert f"{Z_PROJ}.weight" in captured.err
    groups = {g["group"]: g["passed"] for g in report["groups"]}
    assert groups["linear_attn z"] is False and groups["linear_attn qkv"] is True


def test_a_changed_float_tensor_fails_though_its_cosine_is_high(pair, tmp_path):
    src, quant = pair
    bad = _copy(quant, tmp_path)
    key = "language_model.model.layers.0.linear_attn.A_log"

    def nudge(t: dict) -> None:  # 0.1% on one value: cosine 0.99999..., not exact
        a = np.array(t[key])
        a[0] *= 1.001
        t[key] = mx.array(a)

    _rewrite(bad, nudge)
    report = validate(bad, src, progress=False)
    (failed,) = report.failed
    assert failed.key == key and failed.both_float and failed.cosine > 0.999


def test_tensors_on_one_side_only_are_listed(pair, tmp_path, capsys):
    src, quant = pair
    odd = _copy(quant, tmp_path)
    dropped = "language_model.model.layers.2.post_attention_layernorm.weight"

    def edit(t: dict) -> None:
        del t[dropped]
        t["language_model.model.extra.weight"] = mx.ones((4, 4))

    _rewrite(odd, edit)
    assert main(["validate", str(odd), "--reference", str(src), "--no-progress"]) == 0
    out = capsys.readouterr().out
    report = validate(odd, src, progress=False)
    assert report.only_in_quant == ["language_model.model.extra.weight"]
    assert report.only_in_reference == [dropped]
    assert "only in QUANT" in out and "language_model.model.extra.weight" in out
    assert "only in the reference" in out and dropped in out


def test_against_another_mlx_checkpoint_and_an_mxfp4_module(pair, tmp_path):
    """Both sides quantized (8-bit vs 4-bit), and one module rewritten in mxfp4 mode with
    its own entry in config["quantization"]: dequantized in that mode."""
    src, quant = pair
    four = _convert(src, tmp_path / "q4", 4)
    mixed = _copy(quant, tmp_path)
    w_float = open_checkpoint(src).read(
        "model.language_model.layers.1.linear_attn.in_proj_z.weight")

    def to_mxfp4(t: dict) -> None:
        w, scales = mx.quantize(mx.array(w_float), group_size=32, bits=4, mode="mxfp4")
        t[f"{Z_PROJ}.weight"], t[f"{Z_PROJ}.scales"] = w, scales
        del t[f"{Z_PROJ}.biases"]

    _rewrite(mixed, to_mxfp4)
    config = json.loads((mixed / "config.json").read_text())
    config["quantization"][Z_PROJ] = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    (mixed / "config.json").write_text(json.dumps(config))

    report = validate(mixed, four, threshold=0.98, progress=False)
    assert report.passed, [t.key for t in report.failed]
    z = next(t for t in validate(mixed, src, progress=False).tensors
             if t.key == f"{Z_PROJ}.weight")
    w, scales = mx.quantize(mx.array(w_float), group_size=32, bits=4, mode="mxfp4")
    expected = np.array(mx.dequantize(w, scales, group_size=32, bits=4, mode="mxfp4",
                                      dtype=mx.float32),
                        dtype=np.float64).ravel()
    ref = w_float.astype(np.float64).ravel()
    cos = expected @ ref / np.linalg.norm(expected) / np.linalg.norm(ref)
    assert z.quant == "mxfp4/g32" and z.cosine == pytest.approx(cos, abs=1e-9)
    assert z.cosine < 0.995  # mxfp4 on random weights: measurably worse than 8-bit


def test_bad_input_is_one_line_and_exit_2(pair, tmp_path, capsys):
    src, quant = pair
    assert main(["validate", str(src), "--reference", str(quant)]) == 2  # source, not MLX
    assert main(["validate", str(quant), "--reference", str(tmp_path / "none")]) == 2
    assert main(["validate", str(quant), "--reference", str(src), "--threshold", "2"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("swan-quant: error: ") for e in errors)


@pytest.mark.parametrize("key,group", [
    ("model.layers.0.self_attn.q_proj.weight", "attention"),
    ("model.layers.0.mlp.down_proj.weight", "mlp"),
    ("model.layers.0.mlp.switch_mlp.up_proj.weight", "routed experts"),
    ("model.layers.0.mlp.shared_expert.up_proj.weight", "shared experts"),
    ("model.layers.0.mlp.shared_expert_gate.weight", "routers"),
    ("model.layers.0.mlp.gate.weight", "routers"),
    ("model.layers.0.linear_attn.in_proj_b.weight", "linear_attn b"),
    ("model.layers.0.linear_attn.norm.weight", "norms"),
    ("model.norm.weight", "norms"),
    ("lm_head.weight", "lm_head"),
    ("vision_tower.blocks.0.attn.qkv.weight", "other"),
])
def test_groups_of_mlx_keys(key, group):
    assert group_of(key) == group


def test_a_gguf_reference_goes_through_the_same_name_map(tiny_checkpoint, tmp_path,
                                                         monkeypatch):
    """REF as a GGUF file: its Q8_0 blocks are dequantized by the GGUF reader, its float
    tensors (norms) must equal the conversion's exactly."""
    pytest.importorskip("gguf")
    # The GGUF's source folder is kept under the cache root, keyed by content: a fresh
    # root, so a folder left by an earlier run (pointing at its own tmp file) is not reused.
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "cache"))
    hf = tiny_checkpoint("qwen3", tokenizer="small")
    gguf = write_gguf(hf, tmp_path / "m.gguf", qtype="Q8_0")
    quant = _convert(hf, tmp_path / "q8", 8)
    assert main(["validate", str(quant), "--reference", str(gguf), "--threshold", "0.999",
                 "--no-progress", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    storage = {t["group"]: t["reference"] for t in report["tensors"]}
    assert storage["attention"] == "Q8_0" and storage["norms"] == "F32"
    assert {t["group"] for t in report["tensors"]} >= {"attention", "mlp", "embeddings", "norms"}

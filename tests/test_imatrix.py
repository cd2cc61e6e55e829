"""imatrix input (issue 14 items 3 and 5): llama.cpp GGUF and legacy .dat importance
matrices, written from real second moments of the tiny fixtures, read into moments
by HF name, and used by the analyzer, the budget and the fit (swan-quant convert)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from swan_serve.quant import metrics
from swan_serve.quant.allocate import build_plan
from swan_serve.quant.analyze import analyze_checkpoint
from swan_serve.quant.build import BuildError, BuildOptions, prepare_build
from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes
from swan_serve.quant.moments import record
from swan_serve.quant.npmodel import NpModel
from swan_serve.quant.objective import weighted
from swan_serve.quant.recipe import load_recipe
from swan_serve.quant.sources.checkpoint import open_checkpoint
from swan_serve.quant.sources.imatrix import ImatrixError, imatrix_moments, read_imatrix

sys.path.insert(0, str(Path(__file__).parent))
from imatrix_helpers import TEXT, Sums, record_sums, write_dat, write_gguf  # noqa: E402

Maker = Callable[..., Path]


def _moments(path: Path, model_dir: Path):
    ckpt = open_checkpoint(model_dir)
    shapes = checkpoint_shapes(ckpt)
    return imatrix_moments(path, ckpt.config, shapes, build_name_map(ckpt.config, shapes))


@pytest.fixture(scope="module")
def dense(tiny_checkpoint: Maker) -> Path:
    return tiny_checkpoint("qwen3", tokenizer="small")


@pytest.fixture(scope="module")
def moe(tiny_checkpoint: Maker) -> Path:
    return tiny_checkpoint("qwen3_moe", tokenizer="small")


@pytest.fixture(scope="module")
def moe_sums(moe: Path) -> dict[str, Sums]:
    return record_sums(moe)


def test_both_formats_give_the_same_moments_per_expert(moe, moe_sums, tmp_path):
    g = _moments(write_gguf(tmp_path / "imatrix.gguf", moe_sums), moe)
    d = _moments(write_dat(tmp_path / "imatrix.dat", moe_sums), moe)
    assert g.warning() is None and d.warning() is None
    assert sorted(g.moments) == sorted(d.moments)
    for name, m in g.moments.items():
        np.testing.assert_allclose(d.moments[name], m, rtol=1e-5, err_msg=name)
    # Expert e of the stacked ffn_down_exps is HF's experts.e.down_proj: its own mean.
    s = moe_sums["blk.1.ffn_down_exps.weight"]
    e = int(np.argmax(s.counts))
    np.testing.assert_allclose(g.moments[f"model.layers.1.mlp.experts.{e}.down_proj.weight"],
                               s.values[e] / s.counts[e], rtol=1e-5)
    meta = read_imatrix(tmp_path / "imatrix.gguf")
    assert meta.format == "gguf" and meta.datasets == ("fixture-text",)
    assert read_imatrix(tmp_path / "imatrix.dat").format == "dat"


def test_dense_moments_land_on_the_modules_numpy_measures(dense, tmp_path):
    """The names map right: each HF weight gets what the numpy model records at it."""
    got = _moments(write_gguf(tmp_path / "i.gguf", record_sums(dense)), dense).moments
    model, tokenizer = NpModel.load(dense)
    ckpt = open_checkpoint(dense)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    modules = {t.module: t.sources[0] for t in name_map.quantizable()
               if not t.module.endswith("embed_tokens")}
    want = record(model, [tokenizer.encode(TEXT)], modules)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-3, err_msg=name)


def test_an_expert_that_saw_nothing_gets_the_mean_of_the_others(moe, moe_sums, tmp_path):
    sums = dict(moe_sums)
    s = sums["blk.0.ffn_gate_exps.weight"]
    values, counts = s.values.copy(), s.counts.copy()
    values[3], counts[3] = 0.0, 0.0
    sums["blk.0.ffn_gate_exps.weight"] = Sums(values, counts)
    seen = counts > 0
    expected = (values[seen] / counts[seen][:, None]).mean(axis=0)
    for path in (write_gguf(tmp_path / "z.gguf", sums), write_dat(tmp_path / "z.dat", sums)):
        got = _moments(path, moe).moments["model.layers.0.mlp.experts.3.gate_proj.weight"]
        np.testing.assert_allclose(got, expected, rtol=1e-5, err_msg=path.name)


def test_another_models_imatrix_is_one_clear_error(dense, moe_sums, tiny_checkpoint, tmp_path):
    wide = tiny_checkpoint("qwen3", tokenizer="small", overrides={"hidden_size": 256})
    path = write_gguf(tmp_path / "small.gguf", record_sums(dense))
    with pytest.raises(ImatrixError, match="another model: blk.0.attn_k.weight holds 1 x 128"):
        _moments(path, wide)
    deep = {k.replace("blk.", "blk.4"): v for k, v in moe_sums.items() if k.startswith("blk.")}
    with pytest.raises(ImatrixError, match="matches no tensor"):
        _moments(write_dat(tmp_path / "deep.dat", deep), dense)
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00\x00\x00\x03\x00")
    with pytest.raises(ImatrixError, match="truncated"):
        read_imatrix(tmp_path / "junk.dat")


def test_analyzer_error_weights_input_channels_by_the_moments():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 128)).astype(np.float32)
    probes = metrics.unit_probes(128, 4, 0)
    plain = metrics.candidate_sums(w, [(3, 64)], probes)[0]
    flat = metrics.candidate_sums(w, [(3, 64)], probes, importance=np.full(128, 7.0))[0]
    assert flat.rel_rms_error == pytest.approx(plain.rel_rms_error, rel=1e-9)
    d = np.exp(rng.normal(0, 2, size=128))
    got = metrics.candidate_sums(w, [(3, 64)], probes, importance=d)[0]
    from swan_serve.quant.affine import quantize_dequantize

    err = quantize_dequantize(w, 3, 64) - w
    want = np.sqrt(np.sum(err**2 * d) / np.sum(w.astype(np.float64) ** 2 * d))
    assert got.rel_rms_error == pytest.approx(want, rel=1e-6)
    assert got.rel_rms_error != pytest.approx(plain.rel_rms_error, rel=1e-3)


def test_the_budget_follows_the_moments_where_the_numpy_model_cannot_run(moe, moe_sums,
                                                                         tmp_path):
    """MoE: no forward pass; a module whose inputs the imatrix says are huge gets
    more bits than the same imatrix without that outlier gives it."""
    target = "model.layers.1.self_attn.o_proj"
    boosted = dict(moe_sums)
    s = boosted["blk.1.attn_output.weight"]
    boosted["blk.1.attn_output.weight"] = Sums(s.values * 1e4, s.counts)
    ckpt = open_checkpoint(moe)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    recipe = load_recipe("budget")
    bits = {}
    for label, sums in (("plain", moe_sums), ("boosted", boosted)):
        given = _moments(write_gguf(tmp_path / f"{label}.gguf", sums), moe).moments
        manifest = analyze_checkpoint(moe, progress=False, moments=given)
        sens = weighted(ckpt, manifest, recipe, name_map, given)
        assert sens.moments_source == "imatrix"
        plan = build_plan(manifest, name_map, recipe, 4.5, sensitivity=sens)
        assert "imatrix-weighted" in plan.decisions[target].reason
        bits[label] = plan.decisions[target].bits
    assert bits["boosted"] > bits["plain"], bits


def _convert(src: Path, out: Path, imatrix: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swan_serve.quant.cli", "convert", str(src), "-o", str(out),
         "--imatrix", str(imatrix), "--no-progress"],
        capture_output=True, text=True, timeout=600)


def _generates(model_dir: Path) -> None:
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    logits = model(mx.array([tokenizer.encode("Hello")]))
    assert bool(mx.all(mx.isfinite(logits)).item())


def test_cli_converts_qwen3_with_a_gguf_imatrix(dense, tmp_path):
    path = write_gguf(tmp_path / "imatrix.gguf", record_sums(dense))
    run = _convert(dense, tmp_path / "out", path)
    assert run.returncode == 0, run.stderr
    assert "warning" not in run.stderr
    _generates(tmp_path / "out")


def test_cli_converts_qwen3_moe_with_a_partial_dat_and_warns(moe, moe_sums, tmp_path):
    partial = {k: v for k, v in moe_sums.items() if not k.startswith("blk.1.attn")}
    run = _convert(moe, tmp_path / "out", write_dat(tmp_path / "imatrix.dat", partial))
    assert run.returncode == 0, run.stderr
    assert "swan-quant: warning: imatrix imatrix.dat: 13 modules matched, 4 missing" in run.stderr
    plan = (tmp_path / "out" / "swan-plan.json").read_text()
    assert "imatrix-weighted output error" in plan
    _generates(tmp_path / "out")


def test_a_file_for_a_cousin_model_warns_with_counts(dense, moe_sums, tmp_path):
    """qwen3_moe's imatrix on dense qwen3: attention and head match, the MLP does not."""
    found = _moments(write_gguf(tmp_path / "moe.gguf", moe_sums), dense)
    assert (len(found.covered), len(found.missing), len(found.unknown)) == (9, 6, 8)
    assert found.warning().startswith("imatrix moe.gguf: 9 modules matched, 6 missing")
    assert "8 entries name no tensor of this model" in found.warning()


def test_cli_missing_imatrix_exits_2_with_one_line(dense, tmp_path):
    run = _convert(dense, tmp_path / "out", tmp_path / "absent.gguf")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0
    assert run.stderr.startswith("swan-quant: error: ") and "absent.gguf" in run.stderr


def test_cli_wrong_width_imatrix_exits_2(tiny_checkpoint, dense, tmp_path):
    wide = tiny_checkpoint("qwen3", tokenizer="small", overrides={"hidden_size": 256})
    run = _convert(wide, tmp_path / "out", write_dat(tmp_path / "i.dat", record_sums(dense)))
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "was made for another model" in lines[0], run.stderr


def test_a_different_imatrix_is_a_different_build(dense, moe_sums, tmp_path):
    sums = record_sums(dense)
    a = write_gguf(tmp_path / "a.gguf", sums)
    b = write_dat(tmp_path / "b.dat", sums)
    (tmp_path / "a2.gguf").write_bytes(a.read_bytes())

    def key(imatrix: Path | None) -> str:
        options = BuildOptions(cache_dir=tmp_path / "cache",
                               imatrix=None if imatrix is None else str(imatrix))
        return prepare_build(str(dense), options).key

    keys = [key(None), key(a), key(b), key(tmp_path / "a2.gguf")]
    assert len(set(keys[:3])) == 3 and keys[3] == keys[1]
    with pytest.raises(BuildError, match="cannot read imatrix"):
        key(tmp_path / "absent.gguf")


def test_swan_serve_imatrix_flag(dense, tmp_path):
    from swan_serve.server.cli import build_parser, prepare_model

    args = build_parser().parse_args([str(dense), "--no-quantize", "--imatrix", "x.gguf"])
    with pytest.raises(BuildError, match="--no-quantize"):
        prepare_model(args)
    args = build_parser().parse_args([str(dense), "--imatrix", str(tmp_path / "absent.gguf")])
    with pytest.raises(BuildError, match="no such imatrix file"):
        prepare_model(args)


def test_qwen3_5_moe_stacked_experts_get_per_expert_moments(tiny_checkpoint, tmp_path):
    """Qwen3.5 keeps experts stacked in HF ([E, 2I, H] gate_up_proj): the file's
    ffn_gate_exps and ffn_up_exps (one input) give its [E, H] moments, and every
    MLX expert slot of switch_mlp.gate_proj / up_proj reads its own row."""
    from swan_serve.quant.sensitivity import importance_of

    src = tiny_checkpoint("qwen3_5_moe", tokenizer="small")
    sums = record_sums(src)
    gate = "blk.2.ffn_gate_exps.weight"
    sums[gate.replace("gate", "up")] = sums[gate]  # llama.cpp's converter writes both halves
    path = write_gguf(tmp_path / "q35.gguf", sums)
    found = _moments(path, src)
    assert found.warning() is None
    stacked = found.moments["model.language_model.layers.2.mlp.experts.gate_up_proj"]
    s = sums[gate]
    seen = s.counts > 0
    np.testing.assert_allclose(stacked[seen], s.values[seen] / s.counts[seen, None], rtol=1e-5)
    ckpt = open_checkpoint(src)
    tensors = build_name_map(ckpt.config, checkpoint_shapes(ckpt)).by_module()
    # llama.cpp tiles out_proj's value-head channels; the moments come back in HF order.
    out_proj = "model.language_model.layers.0.linear_attn.out_proj.weight"
    hf_order = record_sums(src, llama_order=False)["blk.0.ssm_out.weight"]
    want = hf_order.values[0] / hf_order.counts[0]
    tiled = sums["blk.0.ssm_out.weight"]
    assert not np.allclose(tiled.values[0] / tiled.counts[0], want)  # the test can fail
    np.testing.assert_allclose(found.moments[out_proj], want, rtol=1e-5)
    e = int(np.argmax(s.counts))
    for role in ("gate_proj", "up_proj"):
        t = tensors[f"language_model.model.layers.2.mlp.switch_mlp.{role}"]
        np.testing.assert_array_equal(importance_of(found.moments, t, e), stacked[e])
    run = _convert(src, tmp_path / "out", path)
    assert run.returncode == 0, run.stderr
    _generates(tmp_path / "out")


def test_cli_gguf_source_with_an_imatrix_uses_the_weighted_budget(dense, tmp_path):
    from swan_serve.quant.fixtures.gguf_writer import write_gguf as write_model_gguf

    model = write_model_gguf(dense, tmp_path / "src" / "qwen3.gguf")
    run = _convert(model, tmp_path / "out", write_dat(tmp_path / "i.dat", record_sums(dense)))
    assert run.returncode == 0, run.stderr
    plan = (tmp_path / "out" / "swan-plan.json").read_text()
    assert plan.count("budget, imatrix-weighted output error") == 16
    _generates(tmp_path / "out")

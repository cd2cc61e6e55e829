"""Streaming analysis on real fixture checkpoints of every architecture."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from swan_serve.quant import affine, metrics
from swan_serve.quant.analyze import analyze_checkpoint
from swan_serve.quant.fixtures import ARCHITECTURES, write_checkpoint
from swan_serve.quant.manifest import Manifest, ManifestError
from swan_serve.quant.names import classify
from swan_serve.quant.scoring import AnalysisConfig, load_config, normalise
from swan_serve.quant.sources.checkpoint import open_checkpoint

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


def _config(**analysis) -> AnalysisConfig:
    config = load_config()
    return config.model_copy(update={"analysis": config.analysis.model_copy(update=analysis)})


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fixtures")
    return {a: write_checkpoint(root / a, arch=a, tokenizer="small") for a in ARCHITECTURES}


@pytest.fixture(scope="module")
def manifests(fixtures: dict[str, Path]) -> dict[str, Manifest]:
    return {a: analyze_checkpoint(path, progress=False) for a, path in fixtures.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_tensor_is_classified_and_scored(
    arch: str, fixtures: dict[str, Path], manifests: dict[str, Manifest]
) -> None:
    manifest = manifests[arch]
    ckpt = open_checkpoint(fixtures[arch])
    assert [t.name for t in manifest.tensors] == [t.name for t in ckpt.tensors]
    for record in manifest.tensors:
        info = ckpt.info(record.name)
        assert record.shape == list(info.shape) and record.params == info.numel
        assert record.quantizable == classify(info.name, info.shape).quantizable
        if not record.quantizable:
            assert record.reason and record.metrics is None and record.candidates == []
            continue
        assert 0.0 < record.composite < 1.0
        assert all(0.0 <= v <= 1.0 for v in record.scores.model_dump().values())
        m = record.metrics
        assert 0.1 <= m.spectral_concentration <= 1.0
        assert m.excess_kurtosis > 0  # the fixtures' weights are heavy-tailed
        for c in record.candidates:
            assert c.bpw == affine.bits_per_weight(c.bits, c.group_size)
            assert info.shape[-1] % c.group_size == 0 and c.bits >= record.min_bits
        for group in {c.group_size for c in record.candidates}:
            errors = [c.rel_rms_error for c in record.candidates if c.group_size == group]
            assert errors == sorted(errors, reverse=True)  # more bits, less error
    kept = {r.tensor_class for r in manifest.tensors if not r.quantizable}
    assert kept <= {"norm", "conv", "linear_attention"}
    assert manifest.summary.quantizable == len(manifest.quantizable())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_checkpoint_and_config_give_identical_bytes(
    arch: str, fixtures: dict[str, Path], manifests: dict[str, Manifest], tmp_path: Path
) -> None:
    again = analyze_checkpoint(fixtures[arch], progress=False)
    assert again.to_json() == manifests[arch].to_json()
    path = tmp_path / "m.json"
    again.save(path)
    assert path.read_text() == again.to_json()
    assert Manifest.load(path).to_json() == again.to_json()


def test_parallelism_does_not_change_the_manifest(
    fixtures: dict[str, Path], manifests: dict[str, Manifest]
) -> None:
    serial = analyze_checkpoint(fixtures["qwen3_5_moe"], _config(workers=1), progress=False)
    assert serial.to_json() == manifests["qwen3_5_moe"].to_json()


def test_linear_attention_parts(manifests: dict[str, Manifest]) -> None:
    records = {
        r.name.split("layers.0.")[-1]: r
        for r in manifests["qwen3_5_moe"].tensors
        if "layers.0." in r.name
    }
    assert not records["linear_attn.A_log"].quantizable
    assert not records["linear_attn.dt_bias"].quantizable
    assert records["linear_attn.conv1d.weight"].tensor_class == "conv"
    assert not records["linear_attn.conv1d.weight"].quantizable
    assert records["linear_attn.in_proj_qkv.weight"].tensor_class == "linear_attention"
    assert records["linear_attn.in_proj_qkv.weight"].quantizable
    assert records["mlp.shared_expert.up_proj.weight"].tensor_class == "shared_expert"
    assert records["mlp.shared_expert_gate.weight"].tensor_class == "router"


def test_per_expert_checkpoint_groups_experts(manifests: dict[str, Manifest]) -> None:
    experts = [r for r in manifests["qwen3_moe"].tensors if r.tensor_class == "expert"]
    assert experts and all(r.stack_group and ".experts.*." in r.stack_group for r in experts)
    groups = {r.stack_group for r in experts}
    assert len(groups) == 3 * 2  # gate/up/down in each of the two layers
    assert {r.experts for r in experts} == {None}  # one record per stored tensor


def test_stacked_experts_one_record_with_spread(manifests: dict[str, Manifest]) -> None:
    stacked = [r for r in manifests["qwen3_5_moe"].tensors if r.tensor_class == "expert"]
    assert {r.role for r in stacked} == {"gate_up_proj", "down_proj"}
    for record in stacked:
        assert len(record.shape) == 3
        spread = record.experts
        assert spread.total == record.shape[0] and spread.analysed == list(range(record.shape[0]))
        assert spread.rel_rms_error.min <= record.metrics.rel_rms_error <= spread.rel_rms_error.max
        assert spread.composite.min <= spread.composite.mean <= spread.composite.max


def test_large_expert_stacks_are_sampled(tmp_path: Path) -> None:
    path = write_checkpoint(
        tmp_path / "m",
        arch="qwen3_5_moe",
        tokenizer="small",
        overrides={"num_experts": 24, "num_hidden_layers": 1},
    )
    config = _config(expert_sample=8)
    first = analyze_checkpoint(path, config, progress=False)
    stacked = [r for r in first.tensors if r.tensor_class == "expert"]
    for record in stacked:
        analysed = record.experts.analysed
        assert record.experts.total == 24 and len(analysed) == 8
        assert analysed == sorted(set(analysed)) and analysed[-1] < 24
    assert stacked[0].experts.analysed != list(range(8))  # a seeded sample, not the first 8
    assert analyze_checkpoint(path, config, progress=False).to_json() == first.to_json()


def test_tiny_tensors_are_never_offered_two_bits(fixtures: dict[str, Path]) -> None:
    manifest = analyze_checkpoint(fixtures["qwen3"], _config(tiny_params=20_000), progress=False)
    q = manifest.tensor("model.layers.0.self_attn.q_proj.weight")  # 128 x 128
    gate = manifest.tensor("model.layers.0.mlp.gate_proj.weight")  # 384 x 128
    assert q.min_bits == 3 and min(c.bits for c in q.candidates) == 3
    assert gate.min_bits == 2 and min(c.bits for c in gate.candidates) == 2


def _handmade(root: Path) -> dict[str, np.ndarray]:
    """A checkpoint with one dense and one stacked tensor of known values."""
    rng = np.random.default_rng(11)
    dense = (rng.laplace(size=(96, 256)) * 0.02).astype(np.float32)
    dense[:, 3] *= 8.0
    stack = (rng.laplace(size=(3, 64, 128)) * 0.02 + 0.004).astype(np.float32)
    arrays = {
        "model.layers.0.mlp.down_proj.weight": mx.array(dense).astype(mx.bfloat16),
        "model.layers.0.mlp.experts.gate_up_proj": mx.array(stack).astype(mx.bfloat16),
        "model.norm.weight": mx.ones((256,)).astype(mx.bfloat16),
    }
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "handmade"}))
    mx.save_safetensors(str(root / "model.safetensors"), arrays)
    return {k: np.array(v.astype(mx.float32)) for k, v in arrays.items()}


def _reference_kurtosis(x: np.ndarray) -> float:
    d = x.astype(np.float64).ravel() - x.astype(np.float64).mean()
    return float(np.mean(d**4) / np.mean(d**2) ** 2 - 3.0)


def test_metrics_match_reference_computations(tmp_path: Path) -> None:
    values = _handmade(tmp_path / "m")
    config = _config(error_sample_elements=1 << 30, block_elements=1000)  # all rows, many blocks
    manifest = analyze_checkpoint(tmp_path / "m", config, progress=False)
    probes = metrics.unit_probes(256, config.analysis.probes, config.analysis.seed)

    w = values["model.layers.0.mlp.down_proj.weight"]
    record = manifest.tensor("model.layers.0.mlp.down_proj.weight")
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    share = np.sum(s[: math.ceil(0.1 * 96)] ** 2) / np.sum(s**2)
    assert record.sample.spectral_exact and record.sample.error_rows == 96
    assert record.metrics.spectral_concentration == pytest.approx(share, rel=1e-5)
    assert record.metrics.excess_kurtosis == pytest.approx(_reference_kurtosis(w), rel=1e-5)
    for c in record.candidates:
        w_hat = affine.quantize_dequantize(w, c.bits, c.group_size, "bfloat16")
        assert c.rel_rms_error == pytest.approx(
            affine.rel_rms_error(w, c.bits, c.group_size, "bfloat16"), rel=1e-5
        )
        assert c.noise_amplification == pytest.approx(
            metrics.noise_amplification(w, w_hat - w, probes), rel=1e-5
        )

    stack = values["model.layers.0.mlp.experts.gate_up_proj"]
    record = manifest.tensor("model.layers.0.mlp.experts.gate_up_proj")
    assert record.metrics.excess_kurtosis == pytest.approx(_reference_kurtosis(stack), rel=1e-5)
    shares = [metrics.spectral_concentration(e, 0.1) for e in stack]
    assert record.metrics.spectral_concentration == pytest.approx(np.mean(shares), rel=1e-5)
    four = next(c for c in record.candidates if (c.bits, c.group_size) == (4, 64))
    assert four.rel_rms_error == pytest.approx(
        affine.rel_rms_error(stack, 4, 64, "bfloat16"), rel=1e-5
    )
    assert record.experts.excess_kurtosis.max == pytest.approx(
        max(_reference_kurtosis(e) for e in stack), rel=1e-5
    )
    assert not manifest.tensor("model.norm.weight").quantizable


def test_block_size_does_not_change_the_result(tmp_path: Path) -> None:
    _handmade(tmp_path / "m")
    small = analyze_checkpoint(tmp_path / "m", _config(block_elements=700), progress=False)
    large = analyze_checkpoint(tmp_path / "m", _config(), progress=False)
    for a, b in zip(small.quantizable(), large.quantizable(), strict=True):
        for key, value in a.metrics.model_dump().items():
            assert value == pytest.approx(getattr(b.metrics, key), rel=1e-5), key


def test_normalisation_keeps_scores_apart_where_the_reference_saturates() -> None:
    default, reference = load_config("swan-default"), load_config("swan-reference-v2")
    kurtoses = [5.0, 12.0, 40.0, 400.0]
    ours = [normalise("kurtosis", k, default) for k in kurtoses]
    theirs = [normalise("kurtosis", k, reference) for k in kurtoses]
    assert ours == sorted(ours) and len(set(ours)) == 4 and 0.0 < ours[0] and ours[-1] < 1.0
    assert theirs[1:] == [1.0, 1.0, 1.0]  # clip(k / 10): everything past 10 looks the same
    lo, hi = default.score.bounds["error"]
    assert normalise("error", lo, default) == pytest.approx(0.1)
    assert normalise("error", hi, default) == pytest.approx(0.9)
    assert reference.score.weights == {
        "spectral": 0.2,
        "kurtosis": 0.45,
        "noise": 0.15,
        "error": 0.2,
    }
    assert reference.thresholds == {"bits16": 0.9, "bits8": 0.65, "bits2": 0.1}


def test_manifest_load_rejects_bad_files(tmp_path: Path, manifests: dict[str, Manifest]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.load(bad)
    data = json.loads(manifests["llama"].to_json())
    data["schema_version"] = 99
    bad.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema 99"):
        Manifest.load(bad)
    data["schema_version"] = 1
    del data["tensors"][0]["params"]
    bad.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="params"):
        Manifest.load(bad)


@pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="../shared/models (Qwen indexes) absent")
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("Qwen3-8B", {("mlp_down", True): 36, ("norm", False): 145, ("embedding", True): 1}),
        ("Qwen3-30B-A3B", {("expert", True): 18432, ("router", True): 48}),
        (
            "Qwen3.5-35B-A3B-REAP-25B-derivative",
            {("conv", False): 30, ("linear_attention", False): 60, ("shared_expert", True): 120},
        ),
    ],
)
def test_real_tensor_names_are_classified(model: str, expected: dict) -> None:
    weight_map = json.loads((SHARED_MODELS / model / "model.safetensors.index.json").read_text())
    counts: dict = {}
    for name in weight_map["weight_map"]:
        vector = name.endswith(("norm.weight", "A_log", "dt_bias", "bias"))
        shape = (64,) if vector else (64, 1, 4) if "conv1d" in name else (64, 64)
        c = classify(name, shape)
        counts[(c.tensor_class.value, c.quantizable)] = (
            counts.get((c.tensor_class.value, c.quantizable), 0) + 1
        )
    assert ("other", True) not in counts and ("other", False) not in counts
    for key, count in expected.items():
        assert counts.get(key) == count, key


@pytest.mark.skipif(not (SHARED_MODELS / "stories260K").is_dir(), reason="../shared absent")
def test_real_trained_weights(tmp_path: Path) -> None:
    """stories260K: real trained statistics; its 172-wide down_proj cannot be grouped."""
    manifest = analyze_checkpoint(SHARED_MODELS / "stories260K", progress=False)
    down = manifest.tensor("model.layers.0.mlp.down_proj.weight")
    assert not down.quantizable and "172" in down.reason
    scored = manifest.quantizable()
    assert len(scored) == 5 * 6 + 1  # q, k, v, o, gate, up per layer; the tied embedding
    composites = [r.composite for r in scored]
    assert max(composites) - min(composites) > 0.05  # real tensors differ
    assert analyze_checkpoint(SHARED_MODELS / "stories260K", progress=False).to_json() == (
        manifest.to_json()
    )

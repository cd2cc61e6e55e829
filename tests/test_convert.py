"""quant/convert.py + quant/mlx_names.py: every fixture architecture converts into a
checkpoint that stock mlx_lm loads and runs, with the planned bits per module and
weights that are exactly the fitted groups of the right Hugging Face rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import generate, load
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from swan_serve.quant import affine, fit
from swan_serve.quant.allocate import uniform_plan
from swan_serve.quant.convert import MANIFEST_FILE, ConvertError, convert
from swan_serve.quant.evaluate import compare, load_model
from swan_serve.quant.fixtures import ARCHITECTURES, tensor_specs
from swan_serve.quant.fixtures.configs import read_config
from swan_serve.quant.mlx_names import NameMapError, Piece, build_name_map, checkpoint_shapes
from swan_serve.quant.plan import PLAN_FILE, Decision, Plan
from swan_serve.quant.sources.checkpoint import open_checkpoint

SETTINGS = [(4, 64), (3, 32), (8, 128), (2, 64), (6, 32), (5, 128)]


def mixed_plan(model_dir: Path) -> Plan:
    """Every module gets a different setting, cycling through SETTINGS, so a loader
    that ignored per-module entries would build wrong shapes."""
    ckpt = open_checkpoint(model_dir)
    plan = uniform_plan(build_name_map(ckpt.config, checkpoint_shapes(ckpt)), 4, 64)
    for i, (module, d) in enumerate(sorted(plan.decisions.items())):
        bits, group = SETTINGS[i % len(SETTINGS)]
        plan.decisions[module] = d.model_copy(update={"bits": bits, "group_size": group})
    return plan


def modules_of(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


@pytest.fixture(scope="module", params=ARCHITECTURES)
def converted(request, tiny_checkpoint, tmp_path_factory):
    src = tiny_checkpoint(request.param, tokenizer="small")
    plan = mixed_plan(src)
    out = tmp_path_factory.mktemp(f"{request.param}-mlx") / "model"
    result = convert(src, out, plan, progress=False)
    return request.param, src, out, plan, result


def test_loads_in_stock_mlx_lm_with_the_planned_settings(converted):
    arch, _, out, plan, _ = converted
    model, tokenizer = load(str(out))
    modules = modules_of(model)
    for module, d in plan.decisions.items():
        layer = modules[module]
        assert isinstance(layer, nn.QuantizedLinear | nn.QuantizedEmbedding
                          | QuantizedSwitchLinear), (arch, module)
        assert (layer.bits, layer.group_size) == (d.bits, d.group_size), (arch, module)
    text = generate(model, tokenizer, "def add(a, b):", max_tokens=4)
    assert isinstance(text, str) and len(text) > 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    assert set(plan.decisions) <= set(config["quantization"])
    saved = Plan.load(out / PLAN_FILE)
    assert saved.decisions == plan.decisions
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file()


def expected_rows(arch: str, module: str, ckpt, expert: int | None) -> np.ndarray:
    """The HF rows a module must hold, written out by hand per architecture (an
    independent check of what mlx_names derives from mlx_lm's sanitize)."""
    layer0 = "model.language_model.layers.0" if arch == "qwen3_5_moe" else "model.layers.0"
    if module.endswith("self_attn.k_proj"):  # a plain rename (and prefix swap for Qwen3.5)
        hf = module.replace("language_model.model.", "model.language_model.")
        return ckpt.read(f"{hf}.weight")
    if arch == "qwen3_moe":
        return ckpt.read(f"{layer0}.mlp.experts.{expert}.down_proj.weight")
    gate_up = ckpt.read_expert(f"{layer0}.mlp.experts.gate_up_proj", expert)
    return gate_up[gate_up.shape[0] // 2 :]  # up_proj is the second half


CHECKED_MODULES = {
    "qwen3": [("model.layers.0.self_attn.k_proj", None)],
    "llama": [("model.layers.0.self_attn.k_proj", None)],
    "qwen3_moe": [("model.layers.0.mlp.switch_mlp.down_proj", 5)],
    "qwen3_5_moe": [("language_model.model.layers.0.mlp.switch_mlp.up_proj", 3),
                    ("language_model.model.layers.3.self_attn.k_proj", None)],
}


def test_weights_are_the_fitted_groups_of_the_right_rows(converted):
    arch, src, out, plan, _ = converted
    ckpt = open_checkpoint(src)
    model, _ = load(str(out))
    modules = modules_of(model)
    for module, expert in CHECKED_MODULES[arch]:
        w = expected_rows(arch, module, ckpt, expert)
        layer, d = modules[module], plan.decisions[module]
        packed, scales, biases = layer["weight"], layer["scales"], layer["biases"]
        if expert is not None:
            packed, scales, biases = packed[expert], scales[expert], biases[expert]
        theirs = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32),
                               group_size=d.group_size, bits=d.bits)
        codes, s, b = fit.fit(w, d.bits, d.group_size, "bfloat16")
        assert np.array_equal(np.array(theirs), affine.dequantize(codes, s, b, d.group_size))


def float_plan(plan: Plan) -> Plan:
    decisions = {m: Decision(module=m, params=d.params, in_dim=d.in_dim)
                 for m, d in plan.decisions.items()}
    return plan.model_copy(update={"decisions": decisions})


def test_unquantized_copy_predicts_exactly_like_the_original(converted, tmp_path):
    """Float tensors (norms, conv1d, A_log: Qwen3.5's sanitize changes their values)
    arrive exactly as mlx_lm makes them: an all-float conversion gives the same logits,
    and an 8-bit one nearly the same."""
    arch, src, *_ = converted
    ckpt = open_checkpoint(src)
    plan = uniform_plan(build_name_map(ckpt.config, checkpoint_shapes(ckpt)), 8, 32)
    ref, tok = load_model(src)
    ids = np.array([tok.encode("def add(a, b):\n    return a + b\n" * 4)[:48]], dtype=np.int32)
    convert(src, tmp_path / "f", float_plan(plan), progress=False)
    convert(src, tmp_path / "q8", plan, method="rtn", progress=False)
    models = {name: load_model(tmp_path / name)[0] for name in ("f", "q8")}
    result = compare(ref, models, ids, progress=False)
    assert result["f"].kl_mean == 0.0 and result["f"].top1 == 1.0, arch
    # Random fixtures: 8-bit gives 0.002-0.04, 4-bit 0.2-1.
    assert result["q8"].kl_mean < 0.1, arch


def test_refuses_a_non_empty_target_unless_forced(qwen3_small, tmp_path):
    src, plan = qwen3_small
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ConvertError, match="not empty"):
        convert(src, out, plan, method="rtn", progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    convert(src, out, plan, method="rtn", progress=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folder left


@pytest.fixture(scope="module")
def qwen3_small(tiny_checkpoint):
    src = tiny_checkpoint("qwen3", tokenizer="small")
    ckpt = open_checkpoint(src)
    return src, uniform_plan(build_name_map(ckpt.config, checkpoint_shapes(ckpt)), 4, 64)


def test_a_module_without_decision_is_an_error(qwen3_small, tmp_path):
    src, plan = qwen3_small
    decisions = dict(plan.decisions)
    decisions.pop("model.layers.1.mlp.down_proj")
    with pytest.raises(ConvertError, match="no decision for quantizable module"):
        convert(src, tmp_path / "o", plan.model_copy(update={"decisions": decisions}))
    assert list(tmp_path.iterdir()) == []


def test_a_decision_for_no_module_is_an_error(qwen3_small, tmp_path):
    src, plan = qwen3_small
    decisions = dict(plan.decisions)
    decisions["model.layers.9.mlp.down_proj"] = decisions["model.layers.1.mlp.down_proj"]
    with pytest.raises(ConvertError, match="no quantizable module"):
        convert(src, tmp_path / "o", plan.model_copy(update={"decisions": decisions}))


def test_group_size_must_divide_the_input(qwen3_small, tmp_path):
    src, plan = qwen3_small
    decisions = dict(plan.decisions)
    d = decisions["model.layers.0.self_attn.q_proj"]
    decisions[d.module] = d.model_copy(update={"group_size": 48})
    with pytest.raises(ConvertError, match="q_proj"):
        convert(src, tmp_path / "o", plan.model_copy(update={"decisions": decisions}))


def test_float_modules_and_several_shards(qwen3_small, tmp_path):
    src, plan = qwen3_small
    decisions = dict(plan.decisions)
    d = decisions["model.layers.0.mlp.up_proj"]
    decisions[d.module] = Decision(module=d.module, params=d.params, in_dim=d.in_dim)
    plan = plan.model_copy(update={"decisions": decisions})
    out = tmp_path / "o"
    convert(src, out, plan, method="rtn", progress=False, max_shard_bytes=200_000)
    shards = sorted(p.name for p in out.glob("model*.safetensors"))
    assert len(shards) > 2 and shards[0].startswith("model-00001-of-")
    model, _ = load(str(out))
    assert type(modules_of(model)["model.layers.0.mlp.up_proj"]) is nn.Linear
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["model.layers.0.mlp.up_proj"] is False


def test_a_tensor_mlx_lm_has_no_module_for_is_an_error(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint("qwen3", tokenizer="small"))
    shapes = checkpoint_shapes(ckpt)
    shapes["model.layers.0.mlp.extra_proj.weight"] = (8, 128)
    with pytest.raises(NameMapError, match="map to no module"):
        build_name_map(ckpt.config, shapes)
    shapes = checkpoint_shapes(ckpt)
    del shapes["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(NameMapError, match="no tensor for mlx_lm parameter"):
        build_name_map(ckpt.config, shapes)


def swan_quant(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swan_serve.quant.cli", *args],
                          capture_output=True, text=True, timeout=600)


def test_cli_convert_then_mlx_lm_generate(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3", tokenizer="small")
    out = tmp_path / "q"
    run = swan_quant("convert", str(src), "-o", str(out), "--target-bpw", "4.0", "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "bpw (target 4.0)" in run.stdout
    plan = Plan.load(out / PLAN_FILE)
    assert 3.98 <= plan.achieved_bpw <= 4.0 and plan.recipe == "budget"
    assert (out / MANIFEST_FILE).is_file()
    gen = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(out),
                          "--prompt", "def add(a, b):", "--max-tokens", "4"],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    again = swan_quant("convert", str(src), "-o", str(out), "--no-progress")
    assert again.returncode == 2 and "not empty" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    wrong = swan_quant("convert", str(src), "-o", str(out), "--force", "--recipe",
                       "swan-thresholds", "--target-bpw", "4")
    assert wrong.returncode == 2 and "budget recipe" in wrong.stderr
    forced = swan_quant("convert", str(src), "-o", str(out), "--force", "--recipe",
                        "swan-thresholds", "--no-progress")
    assert forced.returncode == 0, forced.stderr
    assert Plan.load(out / PLAN_FILE).recipe == "swan-thresholds"


@pytest.mark.parametrize("folder,arch,modules", [
    ("Qwen3-8B", "qwen3", 254),
    ("Qwen3-30B-A3B", "qwen3_moe", 386),
    ("Qwen3.5-35B-A3B-REAP-25B-derivative", "qwen3_5_moe", None),
])
def test_real_full_shape_layouts_map_onto_mlx_lm(shared_models_dir, folder, arch, modules):
    """Real names and shapes (no weights): every tensor lands in an mlx_lm parameter."""
    config = read_config(shared_models_dir / folder / "config.json")
    shapes = {s.name: s.shape for s in tensor_specs(arch, config, "bfloat16")}
    name_map = build_name_map(config, shapes)
    used = {s for t in name_map.tensors for s in t.sources}
    assert used | set(name_map.dropped) == set(shapes)
    if modules is not None:
        assert len(name_map.quantizable()) == modules
    by_module = name_map.by_module()
    if arch == "qwen3_moe":
        down = by_module["model.layers.7.mlp.switch_mlp.down_proj"]
        assert [p.hf_name for (p,) in down.slots] == [
            f"model.layers.7.mlp.experts.{e}.down_proj.weight" for e in range(128)]
    if arch == "qwen3_5_moe":
        text = config["text_config"]
        half = text["moe_intermediate_size"]
        up = by_module["language_model.model.layers.2.mlp.switch_mlp.up_proj"]
        assert len(up.slots) == text["num_experts"]
        assert up.slots[5] == (Piece("model.language_model.layers.2.mlp.experts.gate_up_proj",
                                     5, half, 2 * half),)


def test_an_interrupted_conversion_leaves_nothing_behind(qwen3_small, tmp_path):
    src, plan = qwen3_small

    def stop_midway(phase: str, fraction: float) -> None:
        if fraction > 0.3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "o", plan, method="rtn", progress=False,
                on_progress=stop_midway)
    assert list(tmp_path.iterdir()) == []

"""Plans with mxfp4/mxfp8/nvfp4 modules convert, load and generate in stock mlx_lm, and
float32 sources are written at the 16 bits per scale and float weight the plan counts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import generate, load

from swan_serve.quant import modes
from swan_serve.quant.allocate import uniform_plan
from swan_serve.quant.convert import ConvertError, convert
from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes, read_slot_rows
from swan_serve.quant.plan import Plan
from swan_serve.quant.sources.checkpoint import open_checkpoint

# Each float mode and two affine settings, cycled over the modules.
SETTINGS = [("mxfp4", 4, 32), ("affine", 4, 64), ("mxfp8", 8, 32), ("nvfp4", 4, 16),
            ("affine", 8, 32)]


def _plan(src: Path) -> tuple[Plan, object]:
    ckpt = open_checkpoint(src)
    return uniform_plan(build_name_map(ckpt.config, checkpoint_shapes(ckpt)), 4, 64), ckpt


def mode_plan(src: Path) -> Plan:
    plan, _ = _plan(src)
    for i, (module, d) in enumerate(sorted(plan.decisions.items())):
        mode, bits, group = SETTINGS[i % len(SETTINGS)]
        plan.decisions[module] = d.model_copy(
            update={"mode": mode, "bits": bits, "group_size": group})
    return plan


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    src = tiny_checkpoint("qwen3", tokenizer="small")
    plan = mode_plan(src)
    out = tmp_path_factory.mktemp("modes") / "model"
    result = convert(src, out, plan, progress=False)
    return src, out, plan, result


def test_every_mode_loads_and_generates_in_stock_mlx_lm(converted):
    _, out, plan, _ = converted
    assert {d.mode for d in plan.decisions.values()} == {"affine", *modes.FLOAT_MODES}
    model, tokenizer = load(str(out))
    layers = dict(model.named_modules())
    for module, d in plan.decisions.items():
        layer = layers[module]
        assert isinstance(layer, nn.QuantizedLinear | nn.QuantizedEmbedding), module
        assert (layer.mode, layer.bits, layer.group_size) == (d.mode, d.bits, d.group_size)
        assert ("biases" in layer) == (d.mode == "affine"), module
    text = generate(model, tokenizer, "def add(a, b):", max_tokens=4)
    assert isinstance(text, str) and len(text) > 0
    config = json.loads((out / "config.json").read_text())
    some = next(m for m, d in plan.decisions.items() if d.mode == "nvfp4")
    assert config["quantization"][some] == {"group_size": 16, "bits": 4, "mode": "nvfp4"}


def test_float_mode_weights_are_what_mx_quantize_writes(converted):
    src, out, plan, result = converted
    ckpt = open_checkpoint(src)
    name_map = build_name_map(ckpt.config, checkpoint_shapes(ckpt))
    written = mx.load(str(out / "model.safetensors"))
    for t in name_map.tensors:
        d = plan.decisions.get(t.module)
        if not t.quantizable or d.mode == "affine":
            continue
        w = read_slot_rows(ckpt, t.slots[0], 0, t.shape[-2])
        packed, scales = mx.quantize(mx.array(w).astype(mx.bfloat16), mode=d.mode)
        np.testing.assert_array_equal(np.array(written[f"{t.module}.weight"]), np.array(packed))
        np.testing.assert_array_equal(np.array(written[f"{t.module}.scales"]), np.array(scales))
        assert f"{t.module}.biases" not in written
        assert 0 < result.errors[t.module] < (0.05 if d.bits == 8 else 0.2)


def test_a_mode_with_the_wrong_bits_is_an_error(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3", tokenizer="small")
    plan, _ = _plan(src)
    module = sorted(plan.decisions)[0]
    plan.decisions[module] = plan.decisions[module].model_copy(
        update={"mode": "mxfp4", "bits": 4, "group_size": 64})
    with pytest.raises(ConvertError, match="mxfp4 stores 4 bits in groups of 32"):
        convert(src, tmp_path / "out", plan, progress=False)


def tensor_bytes(folder: Path) -> tuple[int, int]:
    """(data bytes of every tensor, file bytes less headers) over the folder's shards."""
    data = files = 0
    for path in folder.glob("*.safetensors"):
        raw = path.read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        data += sum(v["data_offsets"][1] - v["data_offsets"][0]
                    for k, v in header.items() if k != "__metadata__")
        files += len(raw) - 8 - size  # the header: a few KB whatever the model's size
    return data, files


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_written_bytes_are_the_planned_bytes(tiny_checkpoint, tmp_path, dtype):
    src = tiny_checkpoint("qwen3", tokenizer="small", dtype=dtype)
    plan = mode_plan(src)
    out = convert(src, tmp_path / "q", plan, progress=False).out_dir
    data, files = tensor_bytes(out)
    predicted = plan.total_bits / 8
    assert abs(data - predicted) / predicted < 0.005, (data, predicted)
    assert files == data
    written = mx.load(str(out / "model.safetensors"))
    float_dtypes = {v.dtype for v in written.values() if v.dtype not in (mx.uint32, mx.uint8)}
    assert float_dtypes == {mx.bfloat16 if dtype == "bfloat16" else mx.float16}
    model, tokenizer = load(str(out))
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.dtype == (mx.bfloat16 if dtype == "bfloat16" else mx.float16)
    assert bool(mx.all(mx.isfinite(logits)))
    assert len(generate(model, tokenizer, "def add(a, b):", max_tokens=4)) > 0

"""Our numpy GGML dequantizers against llama.cpp's own (the `gguf` package), bit for bit."""

import numpy as np
import pytest

from swan_serve.quant.sources import gguf_quants as gq

gguf = pytest.importorskip("gguf")
from gguf import quants as ref_quants  # noqa: E402

# Byte offsets of each block's f16 scales: random bytes there could be inf/nan.
_F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _random_blocks(name: str, n_blocks: int, seed: int) -> np.ndarray:
    t = gq.BY_NAME[name]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, t.type_size), dtype=np.uint8)
    for at in _F16_FIELDS[name]:
        scale = rng.normal(0, 0.02, size=n_blocks).astype(np.float16)
        blocks[:, at : at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("name", sorted(_F16_FIELDS))
def test_dequantize_matches_llama_cpp_reference(name):
    t = gq.BY_NAME[name]
    blocks = _random_blocks(name, 64, seed=len(name))
    ours = gq.rows_to_float32(blocks.reshape(4, -1), t, 16 * t.block_size)
    qtype = gguf.GGMLQuantizationType[name]
    ref = ref_quants.dequantize(blocks.reshape(4, -1), qtype).astype(np.float32)
    assert ours.shape == ref.shape == (4, 16 * t.block_size)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_by_llama_cpp_round_trips_close(name):
    """Real quantizer output (not random bytes) dequantizes close to the source."""
    x = np.random.default_rng(1).normal(0, 0.05, size=(8, 256)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[name]
    packed = ref_quants.quantize(x, qtype)
    back = gq.rows_to_float32(packed, gq.BY_NAME[name], 256)
    tol = {"Q8_0": 0.002, "Q5_0": 0.01, "Q5_1": 0.01}.get(name, 0.02)
    assert np.abs(back - x).max() < tol


def test_bf16_and_f16_rows():
    x = np.random.default_rng(2).normal(size=(3, 64)).astype(np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    out = gq.rows_to_float32(bf16, gq.BY_NAME["BF16"], 64)
    np.testing.assert_array_equal(out.view(np.uint32), (bf16.astype(np.uint32) << 16))
    half = x.astype(np.float16)
    np.testing.assert_array_equal(gq.rows_to_float32(half, gq.BY_NAME["F16"], 64),
                                  half.astype(np.float32))

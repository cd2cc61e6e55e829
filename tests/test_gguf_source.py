"""GGUF -> HF tensors: fixture checkpoints written as llama.cpp does, read back bit for bit.

The GGUF writer (quant/fixtures/gguf_writer.py) applies llama.cpp's converter
transforms (names, expert stacking, llama's rotary Q/K permutation, Qwen3.5's
value-head reorder, ssm_a, conv1d squeeze, norm +1); the GGUF source must undo
every one of them exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")

from swan_serve.quant.fixtures.gguf_writer import write_gguf  # noqa: E402
from swan_serve.quant.sources.checkpoint import open_checkpoint  # noqa: E402
from swan_serve.quant.sources.gguf_model import prepare_source  # noqa: E402
from swan_serve.quant.sources.gguf_source import open_gguf_checkpoint, v_head_perm  # noqa: E402


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _expected(hf_name: str, value: np.ndarray, arch: str) -> np.ndarray:
    """What the GGUF source hands over for an HF tensor (see gguf_source's docstring)."""
    if arch == "qwen3_5_moe":
        if hf_name.endswith("conv1d.weight"):
            return value.transpose(0, 2, 1)  # mlx_lm's [C, K, 1]
        if hf_name.endswith("norm.weight") and "linear_attn" not in hf_name:
            return value + np.float32(1)  # llama.cpp's +1, kept (sanitize skips it)
    return value


def _assert_round_trip(hf_dir: Path, gguf_path: Path, arch: str) -> None:
    hf = open_checkpoint(hf_dir)
    gg = open_gguf_checkpoint(gguf_path)
    hf_names = {t.name for t in hf.tensors}
    assert {t.name for t in gg.tensors} == hf_names
    for info in hf.tensors:
        want = _expected(info.name, hf.read(info.name), arch)
        got = gg.read(info.name)
        assert got.shape == want.shape, info.name
        if info.name.endswith(".A_log"):
            # ssm_a = -exp(A_log) is many-to-one in float32 (up to 8 A_log per value
            # near 0.2): exp(A_log), the A the model computes, comes back exactly and
            # A_log within one float32 step of exp (2^-23 absolute).
            np.testing.assert_array_equal(_bits(np.exp(got)), _bits(np.exp(want)))
            np.testing.assert_allclose(got, want, rtol=0, atol=2.0**-23)
            continue
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=info.name)
        if info.ndim == 2 and info.shape[0] > 3:  # row reads follow the same map
            rows = [info.shape[0] - 1, 0, 2]
            np.testing.assert_array_equal(_bits(gg.read_rows(info.name, rows)),
                                          _bits(want[rows]), err_msg=info.name)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe"])
def test_float_gguf_gives_back_every_hf_tensor_bit_for_bit(arch, tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint(arch, tokenizer="small")
    gguf_path = write_gguf(hf_dir, tmp_path / f"{arch}.gguf")
    _assert_round_trip(hf_dir, gguf_path, arch)


@pytest.mark.parametrize("ratio", [1, 2, 4, 8, 3])
def test_qwen35_value_heads_come_back_for_any_ratio(ratio, tiny_checkpoint, tmp_path):
    overrides = {"linear_num_key_heads": 2, "linear_num_value_heads": 2 * ratio}
    hf_dir = tiny_checkpoint("qwen3_5_moe", tokenizer="small", overrides=overrides)
    gguf_path = write_gguf(hf_dir, tmp_path / "q35.gguf")
    _assert_round_trip(hf_dir, gguf_path, "qwen3_5_moe")


def test_v_head_perm_is_the_inverse_of_llama_cpp_reorder():
    n_k, n_v, hd = 3, 12, 2  # r = 4: a one-level swap would be wrong here
    hf = np.arange(n_v * hd)
    tiled = hf.reshape(n_k, n_v // n_k, hd).swapaxes(0, 1).reshape(-1)  # llama.cpp's order
    np.testing.assert_array_equal(tiled[v_head_perm(n_k, n_v, hd)], hf)


def test_split_set_reads_as_one_model(tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint("qwen3", tokenizer="small")
    first = write_gguf(hf_dir, tmp_path / "split" / "m.gguf", split_max_tensors=10)
    assert first.name.endswith("-00001-of-00003.gguf")
    _assert_round_trip(hf_dir, first, "qwen3")


def test_source_folder_is_an_ordinary_model_directory(tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint("qwen3", tokenizer="small")
    gguf_path = write_gguf(hf_dir, tmp_path / "m.gguf")
    folder, revision = prepare_source(gguf_path, tmp_path / "sources")
    again, same = prepare_source(gguf_path, tmp_path / "sources")
    assert (again, same) == (folder, revision)
    assert {p.name for p in folder.iterdir()} >= {"config.json", "tokenizer.json",
                                                   "tokenizer_config.json"}
    ckpt = open_checkpoint(folder)
    assert ckpt.config["model_type"] == "qwen3"
    assert ckpt.config["num_hidden_layers"] == open_checkpoint(hf_dir).config[
        "num_hidden_layers"]


def test_a_moved_gguf_is_read_from_where_it_is_now(tiny_checkpoint, tmp_path):
    """The source folder is keyed by content: the same GGUF at a new path (the old one
    deleted) must be read from the new path, not the stale one."""
    hf_dir = tiny_checkpoint("qwen3", tokenizer="small")
    old = write_gguf(hf_dir, tmp_path / "a" / "m.gguf")
    folder, _ = prepare_source(old, tmp_path / "sources")
    new = tmp_path / "b" / "m.gguf"
    new.parent.mkdir()
    old.rename(new)
    again, _ = prepare_source(new, tmp_path / "sources")
    assert again == folder
    ckpt = open_checkpoint(again)
    name = next(t.name for t in ckpt.tensors if t.name.endswith("q_proj.weight"))
    assert ckpt.read(name).shape == open_checkpoint(hf_dir).read(name).shape


def _float_plan(folder: Path):
    from swan_serve.quant.allocate import uniform_plan
    from swan_serve.quant.mlx_names import build_name_map, checkpoint_shapes
    from swan_serve.quant.plan import Decision

    ckpt = open_checkpoint(folder)
    plan = uniform_plan(build_name_map(ckpt.config, checkpoint_shapes(ckpt)), 8, 32)
    decisions = {m: Decision(module=m, params=d.params, in_dim=d.in_dim)
                 for m, d in plan.decisions.items()}
    return plan.model_copy(update={"decisions": decisions})


@pytest.mark.parametrize(("arch", "overrides"), [
    ("llama", None), ("qwen3_moe", None),
    ("qwen3_5_moe", {"linear_num_key_heads": 2, "linear_num_value_heads": 8}),
])
def test_converted_from_gguf_predicts_exactly_like_the_hf_original(arch, overrides,
                                                                    tiny_checkpoint, tmp_path):
    """An all-float conversion of the GGUF gives the HF model's logits through mlx_lm."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from swan_serve.quant.convert import convert
    from swan_serve.quant.evaluate import load_model

    hf_dir = tiny_checkpoint(arch, tokenizer="small", overrides=overrides)
    folder, _ = prepare_source(write_gguf(hf_dir, tmp_path / "m.gguf"), tmp_path / "src")
    convert(folder, tmp_path / "out", _float_plan(folder), progress=False)
    ref, tok = load_model(hf_dir)
    ours, our_tok = load_model(tmp_path / "out")
    text = "def add(a, b):\n    return a + b\n<|im_start|>user\nhi<|im_end|>\n"
    ids = tok.encode(text)
    assert our_tok.encode(text) == ids
    x = mx.array([ids[:48]])
    if arch != "qwen3_5_moe":
        np.testing.assert_array_equal(np.array(ours(x)), np.array(ref(x)))
        return
    # mlx_lm's sanitize adds Qwen3.5's +1 to bf16 norms in bf16 (rounding to 1/256);
    # llama.cpp added it in float32, which the GGUF keeps: give the reference the
    # exact norms, and the A_log the GGUF gives back (within 2^-23, tested above:
    # float32 exp is many-to-one); every other parameter is the reference's own.
    hf, gg = open_checkpoint(hf_dir), open_checkpoint(folder)
    exact = {}
    for key, _ in tree_flatten(ref.parameters()):
        hf_name = key.replace("language_model.model.", "model.language_model.")
        if key.endswith("norm.weight") and "linear_attn" not in key:
            exact[key] = mx.array(hf.read(hf_name) + np.float32(1))
        if key.endswith("A_log"):
            exact[key] = mx.array(gg.read(hf_name))
    ref.update(tree_unflatten(list(exact.items())))
    np.testing.assert_array_equal(np.array(ours(x)), np.array(ref(x)))


def test_tokenizer_option_takes_the_original_files(tiny_checkpoint, tmp_path):
    hf_dir = tiny_checkpoint("qwen3", tokenizer="small")
    gguf_path = write_gguf(hf_dir, tmp_path / "m.gguf")
    rebuilt, rev = prepare_source(gguf_path, tmp_path / "sources")
    given, rev_given = prepare_source(gguf_path, tmp_path / "sources", tokenizer=str(hf_dir))
    assert rev != rev_given  # the cache key sees where the tokenizer came from
    assert (given / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert (rebuilt / "tokenizer.json").read_bytes() != (hf_dir / "tokenizer.json").read_bytes()

"""quant/checkpoint.py: lazy reads that match the stored values, and one-line errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from swan_serve.quant.sources.checkpoint import CheckpointError, open_checkpoint


def _as_float32(array: mx.array) -> np.ndarray:
    return np.array(array.astype(mx.float32))


def _write_model(root: Path, shards: dict[str, dict[str, mx.array]], index: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "test"}))
    weight_map = {}
    for file, tensors in shards.items():
        mx.save_safetensors(str(root / file), tensors)
        weight_map.update({name: file for name in tensors})
    if index:
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )


@pytest.fixture
def tensors() -> dict[str, mx.array]:
    rng = np.random.default_rng(0)
    return {
        "stack": mx.array(rng.standard_normal((4, 6, 32)).astype(np.float32)).astype(mx.bfloat16),
        "half": mx.array(rng.standard_normal((5, 32)).astype(np.float32)).astype(mx.float16),
        "full": mx.array(rng.standard_normal((3, 64)).astype(np.float32)),
        "vector": mx.array(rng.standard_normal((7,)).astype(np.float32)).astype(mx.bfloat16),
    }


def test_reads_match_the_stored_values(tmp_path: Path, tensors: dict[str, mx.array]) -> None:
    _write_model(tmp_path, {"model.safetensors": tensors}, index=False)
    ckpt = open_checkpoint(tmp_path)
    assert [t.name for t in ckpt.tensors] == sorted(tensors)
    assert ckpt.config == {"model_type": "test"}
    assert ckpt.info("stack").dtype == "BF16" and ckpt.info("stack").shape == (4, 6, 32)
    for name, value in tensors.items():
        out = ckpt.read(name)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, _as_float32(value))
    stack = _as_float32(tensors["stack"])
    np.testing.assert_array_equal(ckpt.read_expert("stack", 2), stack[2])
    np.testing.assert_array_equal(ckpt.read_expert_rows("stack", 3, [0, 5]), stack[3][[0, 5]])
    np.testing.assert_array_equal(ckpt.read_expert_rows("stack", 1, slice(2, 4)), stack[1, 2:4])
    half = _as_float32(tensors["half"])
    np.testing.assert_array_equal(ckpt.read_rows("half", np.array([4, 0])), half[[4, 0]])
    np.testing.assert_array_equal(ckpt.read_rows("half", slice(1, 3)), half[1:3])


def test_sharded_index_and_fingerprint(tmp_path: Path, tensors: dict[str, mx.array]) -> None:
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": {n: tensors[n] for n in names[:2]},
        "model-00002-of-00002.safetensors": {n: tensors[n] for n in names[2:]},
    }
    _write_model(tmp_path, shards, index=True)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.files == sorted(shards)
    assert {t.file for t in ckpt.tensors} == set(shards)
    np.testing.assert_array_equal(ckpt.read(names[-1]), _as_float32(tensors[names[-1]]))
    assert ckpt.fingerprint() == open_checkpoint(tmp_path).fingerprint()

    other = tmp_path.parent / "other"
    changed = dict(shards)
    changed["model-00002-of-00002.safetensors"] = {
        n: tensors[n] * 2 if n == names[-1] else tensors[n] for n in names[2:]
    }
    _write_model(other, changed, index=True)
    # The fingerprint hashes headers only: the same names, dtypes and shapes hash alike...
    assert open_checkpoint(other).fingerprint() == ckpt.fingerprint()
    changed["model-00002-of-00002.safetensors"][names[-1]] = tensors[names[-1]][:2]
    _write_model(other, changed, index=True)
    # ...and a different shape does not.
    assert open_checkpoint(other).fingerprint() != ckpt.fingerprint()


def _one_line_error(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        open_checkpoint(path)
    assert "\n" not in str(info.value)


def test_not_a_model_directory(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "missing", "no such directory")
    _one_line_error(tmp_path, "no config.json")
    (tmp_path / "config.json").write_text("{}")
    _one_line_error(tmp_path, "no safetensors weights")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    _one_line_error(tmp_path, "found pytorch_model.bin")


def test_index_naming_a_missing_shard(tmp_path: Path, tensors: dict[str, mx.array]) -> None:
    _write_model(tmp_path, {"a.safetensors": {"full": tensors["full"]}}, index=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra"] = "b.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_line_error(tmp_path, "names a missing shard: .*b.safetensors")


def test_index_naming_a_tensor_the_shard_lacks(
    tmp_path: Path, tensors: dict[str, mx.array]
) -> None:
    _write_model(tmp_path, {"a.safetensors": {"full": tensors["full"]}}, index=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost"] = "a.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_line_error(tmp_path, "lists ghost in a.safetensors")


def test_truncated_shard(tmp_path: Path, tensors: dict[str, mx.array]) -> None:
    _write_model(tmp_path, {"model.safetensors": tensors}, index=False)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    _one_line_error(tmp_path, "truncated shard model.safetensors")
    path.write_bytes(data[:20])
    _one_line_error(tmp_path, "truncated or corrupt")
    path.write_bytes(data[:4])
    _one_line_error(tmp_path, "truncated safetensors file")


def test_corrupt_header(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    header = b"{not json"
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    _one_line_error(tmp_path, "corrupt safetensors header")


def test_unsupported_dtype(tmp_path: Path) -> None:
    ints = {"codes": mx.array(np.arange(64, dtype=np.uint32).reshape(2, 32))}
    _write_model(tmp_path, {"model.safetensors": ints}, index=False)
    _one_line_error(tmp_path, "unsupported dtype U32 of tensor codes")


def test_duplicate_tensor_across_files(tmp_path: Path, tensors: dict[str, mx.array]) -> None:
    _write_model(
        tmp_path,
        {"a.safetensors": {"full": tensors["full"]}, "b.safetensors": {"full": tensors["full"]}},
        index=False,
    )
    _one_line_error(tmp_path, "stored twice")

"""Bad GGUF input: one `swan-quant: error:` line naming the file (and tensor), exit 2,
nothing written to the output or published in the cache."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from swan_serve.quant.cli import main  # noqa: E402
from swan_serve.quant.fixtures.gguf_writer import write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def good(tiny_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(the HF fixture, a valid single-file GGUF of it)."""
    hf = tiny_checkpoint("qwen3", tokenizer="small")
    return hf, write_gguf(hf, tmp_path_factory.mktemp("good") / "m.gguf")


def _convert(model: Path, tmp_path: Path, capsys, monkeypatch, *extra: str) -> str:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SWAN_SERVE_CACHE", str(cache))
    out = tmp_path / "out"
    rc = main(["convert", str(model), "-o", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("swan-quant: error: "), err
    assert not out.exists()
    assert not any((cache / "gguf-sources").glob("*")) if cache.exists() else True
    return err


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _copy(good: tuple[Path, Path], tmp_path: Path) -> Path:
    target = tmp_path / "bad" / "m.gguf"
    target.parent.mkdir()
    shutil.copyfile(good[1], target)
    return target


def test_truncated_file(good, tmp_path, capsys, monkeypatch):
    bad = _copy(good, tmp_path)
    with open(bad, "r+b") as fh:
        fh.truncate(bad.stat().st_size - 1000)
    err = _convert(bad, tmp_path, capsys, monkeypatch)
    assert "truncated GGUF file m.gguf: tensor " in err


def test_wrong_magic_and_version(good, tmp_path, capsys, monkeypatch):
    bad = _copy(good, tmp_path)
    _patch(bad, 0, b"GGML")
    assert "m.gguf is not a GGUF file" in _convert(bad, tmp_path, capsys, monkeypatch)
    _patch(bad, 0, b"GGUF" + struct.pack("<I", 9))
    assert "m.gguf: GGUF version 9 is not supported" in _convert(bad, tmp_path, capsys,
                                                                 monkeypatch)


def test_unknown_tensor_type(good, tmp_path, capsys, monkeypatch):
    bad = _copy(good, tmp_path)
    raw = bad.read_bytes()
    name = b"blk.0.attn_q.weight"
    at = raw.index(name) + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    _patch(bad, at + 4 + 8 * n_dims, struct.pack("<I", 16))  # IQ2_XXS
    err = _convert(bad, tmp_path, capsys, monkeypatch)
    assert "m.gguf: tensor blk.0.attn_q.weight has GGML type 16" in err


def test_unknown_architecture(good, tmp_path, capsys, monkeypatch):
    bad = write_gguf(good[0], tmp_path / "arch" / "m.gguf",
                     metadata={"general.architecture": "falcon"})
    err = _convert(bad, tmp_path, capsys, monkeypatch)
    assert "'falcon' is not supported (supported: llama, qwen2, qwen3, qwen3moe" in err


def test_missing_metadata_key_is_named(good, tmp_path, capsys, monkeypatch):
    bad = write_gguf(good[0], tmp_path / "k" / "m.gguf",
                     metadata={"qwen3.attention.layer_norm_rms_epsilon": None})
    err = _convert(bad, tmp_path, capsys, monkeypatch)
    assert "metadata key qwen3.attention.layer_norm_rms_epsilon is missing" in err


def test_missing_tensor(good, tmp_path, capsys, monkeypatch):
    bad = write_gguf(good[0], tmp_path / "t" / "m.gguf", drop=("blk.1.ffn_up.weight",))
    err = _convert(bad, tmp_path, capsys, monkeypatch)
    assert "m.gguf: tensor blk.1.ffn_up.weight is missing" in err


def test_shape_contradicting_the_metadata(good, tmp_path, capsys, monkeypatch):
    bad = write_gguf(good[0], tmp_path / "s" / "m.gguf",
                     metadata={"qwen3.feed_forward_length": 256})
    err = _convert(bad, tmp_path, capsys, monkeypatch)
    assert "m.gguf: tensor blk.0.ffn_" in err and "wrong shape" in err


def test_incomplete_and_mixed_split_sets(good, tmp_path, capsys, monkeypatch):
    first = write_gguf(good[0], tmp_path / "a" / "m.gguf", split_max_tensors=10)
    other = write_gguf(good[0], tmp_path / "b" / "m.gguf", split_max_tensors=14)
    second = first.with_name("m-00002-of-00003.gguf")
    # A shard of a set split differently (2 shards) in the place of shard 2 of 3.
    shutil.copyfile(other.with_name("m-00002-of-00002.gguf"), second)
    err = _convert(first, tmp_path, capsys, monkeypatch)
    assert "m-00002-of-00003.gguf does not belong to this split set" in err
    second.unlink()
    err = _convert(first, tmp_path, capsys, monkeypatch)
    assert "incomplete GGUF split set: m-00002-of-00003.gguf is missing" in err
    err = _convert(first.with_name("m-00003-of-00003.gguf"), tmp_path, capsys, monkeypatch)
    assert "pass the first shard" in err

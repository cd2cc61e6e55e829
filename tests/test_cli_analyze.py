"""`swan-quant analyze` and `swan-quant inspect` as real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from swan_serve.quant.fixtures import write_checkpoint


def swan_quant(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swan_serve.quant.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    return write_checkpoint(root / "qwen3_moe", arch="qwen3_moe", tokenizer="small", shards=2)


def test_analyze_writes_the_same_manifest_twice(model: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    run = swan_quant("analyze", str(model), "-o", str(first), "--no-progress")
    assert run.returncode == 0, run.stderr
    assert f"wrote {first}" in run.stdout
    assert swan_quant("analyze", str(model), "-o", str(second), "--no-progress").returncode == 0
    assert first.read_bytes() == second.read_bytes()
    manifest = json.loads(first.read_text())
    assert manifest["schema_version"] == 1 and manifest["config"]["name"] == "swan-default"
    assert len(manifest["tensors"]) == manifest["source"]["tensor_count"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_analyze_shows_progress_and_honours_config(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "ref.json"
    run = swan_quant(
        "analyze", str(model), "-o", str(out), "--config", "swan-reference-v2", "--seed", "3"
    )
    assert run.returncode == 0, run.stderr
    # Not a terminal: plain progress lines (bytes and rate) instead of a bar.
    assert "analyze: done" in run.stderr and "B/s" in run.stderr
    manifest = json.loads(out.read_text())
    assert manifest["config"]["name"] == "swan-reference-v2"
    assert manifest["config"]["analysis"]["seed"] == 3


def test_inspect_manifest_and_checkpoint(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    assert swan_quant("analyze", str(model), "-o", str(out), "--no-progress").returncode == 0
    run = swan_quant("inspect", str(out), "--top", "3")
    assert run.returncode == 0, run.stderr
    assert "most sensitive 3:" in run.stdout and "expert" in run.stdout
    run = swan_quant("inspect", str(model))
    assert run.returncode == 0, run.stderr
    assert "expert" in run.stdout and "quantizable" in run.stdout


def _fails_cleanly(model_dir: Path, tmp_path: Path, message: str) -> None:
    out = tmp_path / "manifest.json"
    out.write_text("previous")
    run = swan_quant("analyze", str(model_dir), "-o", str(out), "--no-progress")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swan-quant: error: "), run.stderr
    assert message in lines[0]
    assert out.read_text() == "previous"  # nothing half-written, nothing clobbered
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file


def _copy(model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(model, target)
    return target


def test_missing_directory(tmp_path: Path) -> None:
    _fails_cleanly(tmp_path / "nowhere", tmp_path, "no such directory")


def test_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _fails_cleanly(tmp_path / "empty", tmp_path, "has no config.json")


def test_truncated_shard(model: Path, tmp_path: Path) -> None:
    copy = _copy(model, tmp_path)
    shard = sorted(copy.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 100)
    _fails_cleanly(copy, tmp_path, f"truncated shard {shard.name}")


def test_index_naming_a_missing_file(model: Path, tmp_path: Path) -> None:
    copy = _copy(model, tmp_path)
    shard = sorted(copy.glob("*.safetensors"))[0]
    shard.unlink()
    _fails_cleanly(copy, tmp_path, "names a missing shard")


def test_unsupported_dtype(tmp_path: Path) -> None:
    root = tmp_path / "ints"
    root.mkdir()
    (root / "config.json").write_text("{}")
    mx.save_safetensors(str(root / "model.safetensors"), {"w": mx.zeros((4, 32), mx.int8)})
    _fails_cleanly(root, tmp_path, "unsupported dtype I8 of tensor w")


def test_unknown_preset(model: Path, tmp_path: Path) -> None:
    run = swan_quant("analyze", str(model), "-o", str(tmp_path / "m.json"), "--config", "nope")
    assert run.returncode == 2 and "no preset named 'nope'" in run.stderr
    assert not (tmp_path / "m.json").exists()


def test_inspect_mlx_quantized_checkpoint(tmp_path: Path) -> None:
    from mlx_lm import convert

    source = write_checkpoint(tmp_path / "hf", arch="qwen3", tokenizer="small")
    convert(str(source), mlx_path=str(tmp_path / "mlx"), quantize=True, q_bits=4, q_group_size=64)
    run = swan_quant("inspect", str(tmp_path / "mlx"))
    assert run.returncode == 0, run.stderr
    assert "MLX quantized checkpoint" in run.stdout and "bits 4 group 64" in run.stdout
    # Analysing it is refused in one line: its weights are already packed integers.
    run = swan_quant("analyze", str(tmp_path / "mlx"), "-o", str(tmp_path / "m.json"))
    assert run.returncode == 2 and "unsupported dtype U32" in run.stderr

"""MODEL -> local checkpoint: local directories, the hub cache, and the error paths.

huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported, so the hub cases run
in a child process with their own environment; no network is used or needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from swan_serve.quant.sources.resolve import ResolveError, content_revision, resolve_model

RESOLVE = (
    "import sys\n"
    "from swan_serve.quant.sources.resolve import resolve_model, ResolveError\n"
    "try:\n"
    "    r = resolve_model(sys.argv[1])\n"
    "    print('OK', r.path, r.source, r.revision)\n"
    "except ResolveError as e:\n"
    "    print('ERR', e); sys.exit(3)\n"
)


def _resolve_in_child(model: str, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-c", RESOLVE, model], env=env, capture_output=True, text=True, timeout=60
    )


def _write_model(path: Path, header: bytes = b'{"w": 1}') -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    blob = len(header).to_bytes(8, "little") + header
    (path / "model.safetensors").write_bytes(blob)
    return path


def test_local_directory(tmp_path: Path) -> None:
    model = _write_model(tmp_path / "m")
    resolved = resolve_model(str(model))
    assert resolved.path == model.resolve()
    assert resolved.source == str(model.resolve())
    assert resolved.revision == content_revision(model)
    assert not resolved.is_mlx_quantized


def test_content_revision_follows_the_weights_metadata(tmp_path: Path) -> None:
    a = content_revision(_write_model(tmp_path / "a"))
    b = content_revision(_write_model(tmp_path / "b", header=b'{"w": 2}'))
    assert a != b
    assert a == content_revision(_write_model(tmp_path / "c"))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing-dir-x", "neither an existing directory"),
        (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "has no config.json"),
    ],
)
def test_bad_local_input(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ResolveError, match=message):
        resolve_model(str(make(tmp_path)))


def test_hub_id_served_from_the_local_hub_cache(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    _write_model(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    done = _resolve_in_child("acme/tiny", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    status, path, source, revision = done.stdout.split()
    assert Path(path) == repo / "snapshots" / commit
    assert (source, revision) == ("acme/tiny", commit)


def test_unknown_hub_id_offline_is_one_clear_error(tmp_path: Path) -> None:
    done = _resolve_in_child("acme/does-not-exist", tmp_path)
    assert done.returncode == 3
    assert done.stdout.startswith("ERR acme/does-not-exist is not in the local Hugging Face cache")
    assert "Traceback" not in done.stderr

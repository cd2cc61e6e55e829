"""swan-serve's command line: one-line errors and exit codes, and a model that fails to load
ends the process with status 1. (First-load quantization: tests/test_first_load.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from server_process import SWAN_SERVE, ServerProcess


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SWAN_SERVE), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("/nonexistent/model-dir", "neither an existing directory nor a Hugging Face repo id"),
        ("{tmp}", "has no config.json"),
    ],
)
def test_bad_model_argument_is_one_line_and_exit_2(
    model: str, message: str, tmp_path: Path
) -> None:
    result = run_cli(model.format(tmp=tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("swan-serve: error:")
    assert message in lines[0]


def test_bad_flag_value_names_the_flag(tiny_checkpoint) -> None:
    model = tiny_checkpoint("qwen3", tokenizer="small")
    result = run_cli(str(model), "--max-concurrency", "0")
    assert result.returncode == 2
    assert "--max-concurrency" in result.stderr and "Traceback" not in result.stderr


def test_model_that_fails_to_load_exits_1(tmp_path: Path, tiny_checkpoint) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    source = tiny_checkpoint("qwen3", tokenizer="small")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((source / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    server = ServerProcess(broken)
    with pytest.raises(RuntimeError, match="server exited with 1") as failure:
        server.start(timeout=60)
    assert "could not load the model" in str(failure.value)
    # It answered /health (503) while loading, then reported the error and went away.
    assert server.health_seen and all(status == 503 for status, _ in server.health_seen)
    states = [json.loads(body)["status"] for _, body in server.health_seen]
    assert states[0] == "loading" and set(states) <= {"loading", "error"}
    server.stop()

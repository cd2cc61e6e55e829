"""swan-serve MODEL.gguf: converted once into the cache (with /health phases), then served;
a later start hits the cache; a hub repo needs --gguf-file and the pattern picks files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import OpenAI
from server_process import ServerProcess

pytest.importorskip("gguf")

from swan_serve.quant.cache import ModelCache  # noqa: E402
from swan_serve.quant.fixtures.gguf_writer import write_gguf  # noqa: E402
from swan_serve.quant.sources.gguf_model import pick_first_shard  # noqa: E402
from swan_serve.quant.sources.resolve import ResolveError, resolve_model  # noqa: E402


@pytest.fixture(scope="module")
def gguf_split(tiny_checkpoint, tmp_path_factory) -> Path:
    hf = tiny_checkpoint("qwen3", tokenizer="small")
    return write_gguf(hf, tmp_path_factory.mktemp("gguf") / "tiny.gguf", split_max_tensors=12)


def test_serves_a_gguf_split_set_once_converted(gguf_split: Path, tmp_path: Path) -> None:
    cache_args = ("--cache-dir", str(tmp_path / "cache"))
    with ServerProcess(gguf_split, *cache_args, "--served-model-name", "tiny",
                       quantize=True) as server:
        reply = OpenAI(base_url=server.base_url + "/v1", api_key="x").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.usage.completion_tokens > 0
        first_log = server.log()
    assert "building" in first_log
    phases = {json.loads(body).get("phase") for status, body in server.health_seen
              if status == 503}
    assert phases & {"analyze", "allocate", "convert", "verify"}
    entries = ModelCache(tmp_path / "cache").entries()
    assert len(entries) == 1 and entries[0].info["source"] == str(gguf_split)
    with ServerProcess(gguf_split, *cache_args, quantize=True) as server:
        assert f"from {entries[0].path}" in server.log()


def test_gguf_file_pattern_picks_one_model_in_a_folder(gguf_split: Path, tmp_path: Path):
    folder = gguf_split.parent
    assert pick_first_shard(folder, None) == gguf_split
    assert pick_first_shard(folder, "tiny") == gguf_split
    other = folder / "other-Q8_0.gguf"
    other.write_bytes(b"")
    try:
        with pytest.raises(Exception, match="holds 2 GGUF models"):
            pick_first_shard(folder, None)
        assert pick_first_shard(folder, "Q8_0") == other
        with pytest.raises(Exception, match="no GGUF file matching 'BF16'"):
            pick_first_shard(folder, "BF16")
    finally:
        other.unlink()


def test_hub_repo_errors_are_one_line_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ResolveError, match="not in the local Hugging Face cache"):
        resolve_model("unsloth/Qwen3-8B-GGUF", gguf_file="Q4_K_M",
                      sidecar_root=tmp_path / "cache")
    with pytest.raises(ResolveError, match="--tokenizer applies to GGUF models only"):
        resolve_model(str(tmp_path), tokenizer="Qwen/Qwen3-8B")

"""First load: `swan-serve MODEL` quantizes once into the cache, then serves; later starts
hit the cache. Crashes never publish a partial build, concurrent starts build once, and
bad models fail with one clear line. Everything runs the real pipeline on a tiny model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai import OpenAI
from server_process import SWAN_SERVE, ServerProcess

from swan_serve.quant.build import verify_generates
from swan_serve.quant.cache import ModelCache
from swan_serve.quant.convert import MANIFEST_FILE
from swan_serve.quant.plan import PLAN_FILE

# The same call swan-serve makes on the generation thread, in a process of its own.
BUILDER = (
    "import sys\n"
    "from pathlib import Path\n"
    "from swan_serve.quant.build import BuildOptions, resolve_or_build\n"
    "path = resolve_or_build(sys.argv[1], BuildOptions(cache_dir=Path(sys.argv[2])),\n"
    "                        log=lambda m: print(m, flush=True))\n"
    "print('SERVED', path, flush=True)\n"
)


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen3", tokenizer="small")


def start_builder(model: Path, cache_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(model), str(cache_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def swan_quant(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SWAN_SERVE.with_name("swan-quant")), *args],
                          capture_output=True, text=True, timeout=60)


def served_path(output: str) -> Path:
    return Path(next(line.split(" ", 1)[1] for line in output.splitlines()
                     if line.startswith("SERVED ")))


def test_first_start_builds_then_later_starts_hit_the_cache(model: Path, tmp_path: Path) -> None:
    cache_args = ("--cache-dir", str(tmp_path / "cache"))
    with ServerProcess(model, *cache_args, "--served-model-name", "tiny", quantize=True) as server:
        first_log = server.log()
        reply = OpenAI(base_url=server.base_url + "/v1", api_key="x").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.usage.completion_tokens > 0
    assert "building" in first_log
    loading = [json.loads(body) for status, body in server.health_seen if status == 503]
    assert loading and all({"phase", "progress"} <= set(b) for b in loading)
    entries = ModelCache(tmp_path / "cache").entries()
    assert len(entries) == 1
    config = json.loads((entries[0].path / "config.json").read_text())
    assert "quantization" in config  # what is served is the quantized build
    assert {MANIFEST_FILE, PLAN_FILE} <= {p.name for p in entries[0].path.iterdir()}
    stamp = entries[0].path.stat().st_mtime_ns

    with ServerProcess(model, *cache_args, quantize=True) as server:
        second_log = server.log()
    assert "building" not in second_log and "analyze" not in second_log
    assert f"from {entries[0].path}" in second_log
    assert entries[0].path.stat().st_mtime_ns == stamp


def test_two_concurrent_starts_build_once(model: Path, tmp_path: Path) -> None:
    # The second starts while the first holds the lock and builds: it either waits for that
    # build or, if the tiny build is already published when it looks, finds it. Either way
    # nothing is built twice. (tests/test_cache.py proves the waiting with a slow build.)
    first = start_builder(model, tmp_path / "cache")
    seen = []
    for line in first.stdout:
        seen.append(line)
        if line.startswith("building "):
            break
    second = start_builder(model, tmp_path / "cache")
    procs = [first, second]
    outputs = ["".join(seen) + first.communicate(timeout=300)[0],
               second.communicate(timeout=300)[0]]
    assert all(p.returncode == 0 for p in procs), outputs
    builds = [line for out in outputs for line in out.splitlines() if line.startswith("building ")]
    assert len(builds) == 1, outputs
    assert served_path(outputs[0]) == served_path(outputs[1])

    # `swan-quant cache` lists the one build and removes it.
    cache_args = ["cache", "--cache-dir", str(tmp_path / "cache")]
    (entry,) = ModelCache(tmp_path / "cache").entries()
    listing = swan_quant(*cache_args, "ls")
    assert listing.returncode == 0 and entry.key in listing.stdout and "budget" in listing.stdout
    assert swan_quant(*cache_args, "rm", "no-such-key").returncode == 2
    removed = swan_quant(*cache_args, "rm", entry.key[:6])
    assert removed.returncode == 0 and f"removed {entry.key}" in removed.stdout
    assert not ModelCache(tmp_path / "cache").entries()


def test_sigkill_during_the_build_never_publishes_a_partial_model(
    model: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    cache = ModelCache(cache_dir)
    began = time.monotonic()
    full = start_builder(model, cache_dir)
    assert full.wait(timeout=300) == 0
    duration = time.monotonic() - began
    cache.remove(cache.entries()[0])
    rng = random.Random(20)
    interrupted = 0
    for _ in range(20):
        proc = start_builder(model, cache_dir)
        time.sleep(rng.uniform(0.0, duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        interrupted += cache.tmp_dir.exists() and any(cache.tmp_dir.iterdir())
        for entry in cache.entries():  # whatever was published must be complete and run
            verify_generates(entry.path)
            cache.remove(entry)
    assert interrupted > 0, "no kill landed inside a build: the test proved nothing"
    proc = start_builder(model, cache_dir)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    verify_generates(served_path(output))
    assert list(cache.tmp_dir.iterdir()) == []  # the killed builds' leftovers are gone


def _copy_model(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    return dest


def _unsupported_architecture(model: Path, tmp: Path) -> Path:
    bad = _copy_model(model, tmp / "m")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))
    return bad


def _missing_tokenizer(model: Path, tmp: Path) -> Path:
    bad = _copy_model(model, tmp / "m")
    (bad / "tokenizer.json").unlink()
    return bad


def _corrupt_shard(model: Path, tmp: Path) -> Path:
    bad = _copy_model(model, tmp / "m")
    shard = bad / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return bad


def _larger_than_the_free_disk(model: Path, tmp: Path) -> Path:
    """A real (sparse) checkpoint whose one tensor needs more disk than the cache has."""
    bad = tmp / "huge"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, bad / name)
    elements = shutil.disk_usage(tmp).free * 4  # bf16: 8x the free space on disk
    header = json.dumps({"w": {"dtype": "BF16", "shape": [elements],
                               "data_offsets": [0, 2 * elements]}}).encode()
    shard = bad / "model.safetensors"
    with open(shard, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
    os.truncate(shard, 8 + len(header) + 2 * elements)
    return bad


@pytest.mark.parametrize(
    ("make_model", "message"),
    [
        (_unsupported_architecture, "architecture 'no_such_arch' is not supported"),
        (_missing_tokenizer, "has no tokenizer"),
        (_corrupt_shard, "truncated"),
        (_larger_than_the_free_disk, "not enough disk space"),
    ],
)
def test_bad_models_fail_with_one_clear_line(model: Path, tmp_path: Path, make_model,
                                             message: str) -> None:
    bad = make_model(model, tmp_path)
    run = subprocess.run([str(SWAN_SERVE), str(bad), "--cache-dir", str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("swan-serve: error:") and message in last, run.stderr
    assert not ModelCache(tmp_path / "cache").entries()


def test_unknown_hub_id_fails_with_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([str(SWAN_SERVE), "acme/no-such-model", "--cache-dir",
                          str(tmp_path / "cache"), "--port", "0"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last == ("swan-serve: error: acme/no-such-model is not in the local Hugging Face "
                    "cache and cannot be downloaded (offline, HF_HUB_OFFLINE=1, or no network)")

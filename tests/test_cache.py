"""The first-load cache on its own: hits, atomic publish, locking across processes, crashes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from swan_serve.quant.cache import ENTRY_FILE, CacheError, ModelCache, entry_key

# A child process that builds one entry slowly, file by file, counting its builds.
BUILDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from swan_serve.quant.cache import ModelCache

    root, counter, delay = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])

    def build(tmp):
        with open(counter, "a") as f:
            f.write("build\\n")
        for i in range(10):
            (tmp / f"part-{i}.bin").write_bytes(bytes([i]) * 1000)
            time.sleep(delay)
        (tmp / "complete").write_text("yes")

    path = ModelCache(root).get_or_build("org/model", "k" * 16, build, log=print)
    print("SERVED", path, flush=True)
    """
)


def _run_builder(root: Path, counter: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(root), str(counter), str(delay)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _assert_complete(entry: Path) -> None:
    assert (entry / "complete").read_text() == "yes"
    assert sorted(p.name for p in entry.glob("part-*")) == [f"part-{i}.bin" for i in range(10)]
    assert json.loads((entry / ENTRY_FILE).read_text())["source"] == "org/model"


def test_miss_builds_then_hit_does_not(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "weights").write_text("w")

    first = cache.get_or_build("org/m", "a" * 16, build)
    second = cache.get_or_build("org/m", "a" * 16, build)
    assert first == second and len(calls) == 1
    assert (first / "weights").read_text() == "w"
    assert list(cache.tmp_dir.iterdir()) == []
    rebuilt = cache.get_or_build("org/m", "a" * 16, build, rebuild=True)
    assert rebuilt == first and len(calls) == 2 and (rebuilt / "weights").exists()


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)

    def build(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise ValueError("verification failed")

    with pytest.raises(ValueError):
        cache.get_or_build("org/m", "b" * 16, build)
    assert cache.lookup("org/m", "b" * 16) is None
    assert list(cache.tmp_dir.iterdir()) == []


def test_key_changes_with_each_input() -> None:
    base = entry_key("org/m", "rev1", {"target_bpw": 4.5})
    assert base == entry_key("org/m", "rev1", {"target_bpw": 4.5})
    assert base != entry_key("org/m", "rev2", {"target_bpw": 4.5})
    assert base != entry_key("org/m", "rev1", {"target_bpw": 4.0})
    assert base != entry_key("org/other", "rev1", {"target_bpw": 4.5})


def test_not_enough_disk_space_says_how_much(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    with pytest.raises(CacheError, match=r"needs about .* GB and .* GB is free"):
        cache.get_or_build("org/m", "c" * 16, lambda tmp: None, required_bytes=10**18)
    assert cache.lookup("org/m", "c" * 16) is None


def test_two_processes_build_once(tmp_path: Path) -> None:
    counter = tmp_path / "builds.txt"
    procs = [_run_builder(tmp_path / "cache", counter, 0.05) for _ in range(2)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert counter.read_text().count("build") == 1
    served = {line.split()[1] for out in outputs for line in out.splitlines() if "SERVED" in line}
    assert len(served) == 1
    _assert_complete(Path(served.pop()))
    assert any("waiting" in out for out in outputs)


def test_sigkill_never_leaves_a_partial_entry(tmp_path: Path) -> None:
    root, counter = tmp_path / "cache", tmp_path / "builds.txt"
    cache = ModelCache(root)
    rng = random.Random(1234)
    published = interrupted = 0
    for _ in range(20):
        proc = _run_builder(root, counter, 0.05)
        time.sleep(rng.uniform(0.05, 1.0))  # start-up ~0.2 s, build ~0.5 s
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        interrupted += any(cache.tmp_dir.glob("*")) if cache.tmp_dir.exists() else 0
        entry = cache.lookup("org/model", "k" * 16)
        if entry is not None:
            _assert_complete(entry)
            published += 1
            cache.remove(cache.entries()[0])
        else:
            assert not cache.entry_path("org/model", "k" * 16).exists()
    # The next start cleans up whatever the killed builders left in tmp/.
    proc = _run_builder(root, counter, 0.0)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    _assert_complete(cache.lookup("org/model", "k" * 16))
    assert list(cache.tmp_dir.iterdir()) == []
    assert interrupted > 0, "no kill landed mid-build: the test proved nothing"

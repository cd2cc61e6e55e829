"""The prefix cache's second tier: states evicted from memory, kept on disk.

    DIR/<model key>/<hash of the tokens>.safetensors     one state each

A state goes to disk when the memory tier evicts it (and, at a clean shutdown, whatever
memory still holds that disk does not): incremental, one file per state, never a rewrite.
Files are content-addressed by the token prefix they cover, so a state is written once.
Each is written under a temporary name, fsynced, renamed into place and the folder fsynced:
a crash at any moment (kill -9, power loss) leaves only whole entries plus temporary files,
which the next start deletes. A file that does not read back whole is skipped and deleted.

The folder is bounded by `--prefix-cache-disk-bytes` (least recently used files go first,
in the memory tier's order of priorities). Its index is a PrefixCache of file paths, so a
prompt finds its longest prefix on disk as it does in memory; a disk hit is loaded only
when that is expected to be faster than computing the same tokens again (read speed is
measured on each load, prefill speed by the prefill scheduler's step-cost fit).

The files are mlx-lm's prompt-cache format (`mlx_lm.models.cache.load_prompt_cache` reads
them), with the tokens in the metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx_lm
import numpy as np
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from ..engine.quantized_kv import batchable, portable
from .kv_state import State, evaluate
from .prefix_cache import Entry, Match, PrefixCache, Priority

log = logging.getLogger("swan_serve.prefix_cache")

FORMAT_VERSION = 2
_SUFFIX = ".safetensors"
# Recompute-time estimate: (tokens to compute, tokens already cached) -> seconds, or None
# while the step-cost fit does not know yet.
RecomputeCost = Callable[[int, int], float | None]


def model_key(model_dir: Path, compute_dtype: str, kv_layout: str = "float") -> str:
    """Names the model's files (by name, size and modification time), how it computes and
    how its KV is stored: a state is only valid for exactly these."""
    digest = hashlib.sha256(
        f"{FORMAT_VERSION} {mlx_lm.__version__} {compute_dtype} {kv_layout}".encode())
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors"):
            stat = path.stat()
            digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def file_name(tokens: tuple[int, ...]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype="<i8").tobytes()).hexdigest()[:40] + _SUFFIX


@dataclass(frozen=True)
class Loaded:
    """A state read from disk: it covers `tokens`; the prompt shares its first `length`."""

    tokens: tuple[int, ...]
    length: int
    state: State
    priority: Priority
    seconds: float


class DiskTier:
    def __init__(self, folder: Path, budget_bytes: int,
                 recompute_cost: RecomputeCost = lambda _tokens, _context: None,
                 on_load: Callable[[float], None] | None = None):
        self.folder = folder
        self._on_load = on_load  # seconds each load took
        self._index = PrefixCache(budget_bytes, on_evict=self._delete, on_drop=self._delete)
        self._recompute_cost = recompute_cost
        self._read_bytes_per_second: float | None = None
        self.spills = 0
        self.loads = 0
        # Recency lives in file mtimes so it survives restarts; the clock behind a
        # write's mtime can be coarser than the gap between two spills, so each spill
        # stamps a strictly later time itself.
        self._last_stamp_ns = 0

    @property
    def bytes_held(self) -> int:
        return self._index.bytes_held

    def __len__(self) -> int:
        return len(self._index)

    # ------------------------------------------------------------ start

    def scan(self) -> tuple[int, int]:
        """Indexes the folder's whole entries (oldest first, so the budget keeps the most
        recent) and deletes the rest; returns (entries indexed, files skipped)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        skipped = 0
        files = []
        for path in self.folder.iterdir():
            if path.name.startswith("."):  # a write that a crash cut short
                path.unlink(missing_ok=True)
            elif path.suffix == _SUFFIX:
                files.append((path.stat().st_mtime_ns, path))
                self._last_stamp_ns = max(self._last_stamp_ns, files[-1][0])
        for _, path in sorted(files):
            header = read_header(path)
            if header is None or path.name != file_name(header["tokens"]):
                log.warning("prefix cache: skipping %s (not a whole entry)", path.name)
                path.unlink(missing_ok=True)
                skipped += 1
                continue
            if self._index.store(header["tokens"], path, path.stat().st_size,
                                 header["trimmable"], header["priority"]) is None:
                path.unlink(missing_ok=True)  # over the budget, or covered by another
        return len(self._index), skipped

    # ------------------------------------------------------------ spill

    def spill(self, entry: Entry) -> bool:
        """Writes an entry the memory tier gives up; False when disk has nothing to gain
        (already there, covered, or larger than the budget)."""
        tokens = entry.tokens()
        if not self._index.wants(tokens, entry.nbytes, entry.trimmable, entry.priority):
            return False
        path = self.folder / file_name(tokens)
        if not path.exists():
            write_entry(path, tokens, entry.state, entry.trimmable, entry.priority)
        self._stamp(path)
        self._index.store(tokens, path, path.stat().st_size, entry.trimmable, entry.priority)
        self.spills += 1
        return True

    # ------------------------------------------------------------ load

    def fetch(self, prompt: tuple[int, ...] | list[int], limit: int, have: int
              ) -> Loaded | None:
        """The state of the longest prefix of `prompt` (at most `limit` tokens) on disk,
        if it covers more than the `have` tokens memory gives and reading it is expected
        to beat computing those tokens."""
        match = self._index.lookup(prompt, limit, touch=False)
        if match is None or match.length <= have or not self._worth_reading(match, have):
            return None
        started = time.perf_counter()
        path: Path = match.entry.state
        try:
            state = batchable(load_prompt_cache(str(path)))
            evaluate(state)
        except Exception:
            log.exception("prefix cache: could not read %s; dropping it", path.name)
            self._index.discard(match.entry)
            self._delete(match.entry)
            return None
        seconds = time.perf_counter() - started
        speed = path.stat().st_size / max(seconds, 1e-6)
        self._read_bytes_per_second = speed if self._read_bytes_per_second is None else \
            0.5 * (self._read_bytes_per_second + speed)
        self._index.lookup(prompt, limit)  # marks it (and the states on its path) used
        self.loads += 1
        if self._on_load is not None:
            self._on_load(seconds)
        return Loaded(match.entry.tokens(), match.length, state, match.entry.priority, seconds)

    def _worth_reading(self, match: Match, have: int) -> bool:
        recompute = self._recompute_cost(match.length - have, have)
        if recompute is None or self._read_bytes_per_second is None:
            return True  # nothing measured yet: reading is the bet (and measures it)
        return match.entry.nbytes / self._read_bytes_per_second < recompute

    def _stamp(self, path: Path) -> None:
        stamp = max(time.time_ns(), self._last_stamp_ns + 1)
        os.utime(path, ns=(stamp, stamp))
        self._last_stamp_ns = stamp

    def _delete(self, entry: Entry) -> None:
        Path(entry.state).unlink(missing_ok=True)


# ------------------------------------------------------------ files


def write_entry(path: Path, tokens: tuple[int, ...], state: State, trimmable: bool,
                priority: Priority) -> None:
    """Writes one state so that `path` is either absent or whole, whatever happens."""
    staging = path.with_name(f".{path.stem}.{os.getpid()}.tmp{_SUFFIX}")
    metadata = {"format": str(FORMAT_VERSION), "tokens": json.dumps(list(tokens)),
                "trimmable": str(int(trimmable)), "priority": str(int(priority))}
    try:
        save_prompt_cache(str(staging), portable(state), metadata)
        _fsync(staging)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on some systems (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_header(path: Path) -> dict[str, Any] | None:
    """The entry's tokens, priority and trimmability, or None unless the file is whole
    (its safetensors header parses and its data ends exactly at the end of the file)."""
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            size = path.stat().st_size
            if length > size - 8:
                return None
            header = json.loads(file.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)
        if 8 + length + end != size:
            return None
        meta = header.get("__metadata__", {})
        if meta.get("0.format") != str(FORMAT_VERSION):
            return None
        return {"tokens": tuple(json.loads(meta["0.tokens"])),
                "trimmable": meta["0.trimmable"] == "1",
                "priority": Priority(int(meta["0.priority"]))}
    except (OSError, ValueError, KeyError, struct.error):
        return None

"""First-load cache of quantized checkpoints: key, lock, atomic publish.

Layout under the cache root (``--cache-dir``, ``$SWAN_SERVE_CACHE`` or
``~/.cache/swan-serve``)::

    models/<slug>-<key>/     complete MLX checkpoints, each with swan-entry.json
    tmp/<key>.<pid>.<rand>/  builds in progress (or left by a crash)
    locks/<key>.lock         one flock per entry: one builder, the others wait

An entry appears only through one atomic rename of a finished, verified build, so a
crash or SIGKILL at any moment leaves either no entry or a complete one; what a
crash leaves in tmp/ is removed by the next start that finds its lock free.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from swan_serve import __version__

# Bump when the bytes a build writes change for the same inputs, so old entries
# are not served by new code that would have built them differently.
BUILD_FORMAT = 1
ENTRY_FILE = "swan-entry.json"
ENV_CACHE_DIR = "SWAN_SERVE_CACHE"


class CacheError(RuntimeError):
    """A cache operation failed; the message is one clear line."""


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    info: dict

    @property
    def key(self) -> str:
        return self.info["key"]

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def default_cache_root() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "swan-serve"


def entry_key(source: str, revision: str, recipe: dict) -> str:
    """Identity of a build: what was quantized, how, and by which code."""
    identity = {
        "source": source,
        "revision": revision,
        "recipe": recipe,
        "code": f"{__version__}/format-{BUILD_FORMAT}",
    }
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: how a build keys an input file (an imatrix, moments)."""
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _slug(source: str) -> str:
    name = source.rstrip("/").split("/")[-1] if "/" in source else source
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:48] or "model"


class ModelCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_cache_root()
        self.models_dir = self.root / "models"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"

    # -- lookup -----------------------------------------------------------------

    def entry_path(self, source: str, key: str) -> Path:
        return self.models_dir / f"{_slug(source)}-{key}"

    def lookup(self, source: str, key: str) -> Path | None:
        path = self.entry_path(source, key)
        return path if (path / ENTRY_FILE).is_file() else None

    def entries(self) -> list[CacheEntry]:
        found = []
        for path in sorted(self.models_dir.glob("*")):
            marker = path / ENTRY_FILE
            if marker.is_file():
                found.append(CacheEntry(path, json.loads(marker.read_text())))
        return found

    def remove(self, entry: CacheEntry) -> None:
        with self._lock(entry.key, wait_message=None):
            trash = self._new_tmp_path(entry.key, "rm")
            os.rename(entry.path, trash)  # atomic: the entry is gone at once
            shutil.rmtree(trash, ignore_errors=True)

    # -- build ------------------------------------------------------------------

    def get_or_build(
        self,
        source: str,
        key: str,
        build: Callable[[Path], None],
        *,
        info: dict | None = None,
        required_bytes: int = 0,
        rebuild: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> Path:
        """Return the entry for `key`, building it with `build(tmp_dir)` on a miss.

        `build` writes a complete checkpoint into the empty directory it is given
        and raises if it cannot (including when the result does not verify).
        """
        say = log or (lambda message: print(message, file=sys.stderr))
        if not rebuild and (hit := self.lookup(source, key)):
            return hit
        wait_message = f"another process is building {source} into the cache; waiting for it"
        with self._lock(key, wait_message=wait_message, log=say):
            # The process we waited for may have published it meanwhile.
            if not rebuild and (hit := self.lookup(source, key)):
                return hit
            self.clean_stale(own_key=key)
            self.check_free_space(required_bytes)
            tmp = self._new_tmp_path(key, "build")
            tmp.mkdir(parents=True)
            try:
                build(tmp)
                record = {**(info or {}), "key": key, "source": source, "created": time.time()}
                _write_json_durably(tmp / ENTRY_FILE, record)
                return self._publish(tmp, self.entry_path(source, key), key)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def _publish(self, tmp: Path, final: Path, key: str) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        _fsync_tree(tmp)
        if final.exists():  # --rebuild: move the old entry out of the way first
            old = self._new_tmp_path(key, "old")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
        return final

    def clean_stale(self, own_key: str | None = None) -> list[Path]:
        """Remove what crashed builds left in tmp/: every file or directory there is
        named after its entry's key, and is stale once nobody holds that key's lock."""
        removed = []
        for path in sorted(self.tmp_dir.glob("*")):
            key = path.name.lstrip(".").split(".", 1)[0]
            if key == own_key:  # we hold this lock, so no one else is writing here
                _remove(path)
                removed.append(path)
                continue
            with self._try_lock(key) as locked:
                if locked:
                    _remove(path)
                    removed.append(path)
        return removed

    def check_free_space(self, required_bytes: int) -> None:
        if required_bytes <= 0:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free < required_bytes:
            raise CacheError(
                f"not enough disk space in {self.root}: the build needs about "
                f"{_gb(required_bytes)} and {_gb(free)} is free"
            )

    def _new_tmp_path(self, key: str, what: str) -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"{key}.{what}.{os.getpid()}.{secrets.token_hex(4)}"

    # -- locking ----------------------------------------------------------------

    def _lock_file(self, key: str) -> Path:
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        return self.locks_dir / f"{key}.lock"

    @contextmanager
    def _lock(
        self, key: str, wait_message: str | None, log: Callable[[str], None] | None = None
    ) -> Iterator[None]:
        # flock is released by the kernel when its holder dies, even by SIGKILL,
        # so a crashed builder never leaves the others waiting forever.
        with open(self._lock_file(key), "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait_message and log:
                    log(wait_message)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def _try_lock(self, key: str) -> Iterator[bool]:
        with open(self._lock_file(key), "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _write_json_durably(path: Path, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_tree(root: Path) -> None:
    """Flush a finished build to disk before it is published (power loss, not just kill)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

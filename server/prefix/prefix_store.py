"""The prefix cache on disk: saved when the server stops, read back when it starts.

    DIR/<model key>/index.json          states in least- to most-recently-used order
    DIR/<model key>/<n>.safetensors     one state each (mlx_lm's save_prompt_cache format)

A state is only valid for the exact weights and compute dtype that produced it, so the
folder is named by a key of both (and the format and mlx_lm versions). A save is written
into a fresh folder and renamed over the old one: a crash mid-save leaves the last one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import mlx_lm
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from .kv_state import evaluate, is_trimmable, state_nbytes
from .prefix_cache import PrefixCache, Priority

log = logging.getLogger("swan_serve.prefix_cache")

FORMAT_VERSION = 1
_INDEX = "index.json"


def model_key(model_dir: Path, compute_dtype: str) -> str:
    """Names the model's files (by name, size and modification time) and how it computes."""
    digest = hashlib.sha256(f"{FORMAT_VERSION} {mlx_lm.__version__} {compute_dtype}".encode())
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors"):
            stat = path.stat()
            digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def save(cache: PrefixCache, folder: Path) -> int:
    """Writes every state of `cache` to `folder` (replacing what is there); returns how
    many were written."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-", dir=folder.parent))
    try:
        index = []
        for number, entry in enumerate(cache.entries()):
            name = f"{number}.safetensors"
            save_prompt_cache(str(staging / name), entry.state)
            index.append({"file": name, "tokens": list(entry.tokens()),
                          "priority": int(entry.priority)})
        (staging / _INDEX).write_text(json.dumps({"version": FORMAT_VERSION, "states": index}))
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return len(index)


def load(cache: PrefixCache, folder: Path) -> int:
    """Stores the states saved in `folder` into `cache` (least recently used first, so the
    budget keeps the most recent); returns how many it holds afterwards."""
    index_path = folder / _INDEX
    if not index_path.is_file():
        return 0
    index = json.loads(index_path.read_text())
    if index.get("version") != FORMAT_VERSION:
        log.warning("ignoring the saved prefix cache in %s: format %s, not %s", folder,
                    index.get("version"), FORMAT_VERSION)
        return 0
    for item in index["states"]:
        state = load_prompt_cache(str(folder / item["file"]))
        entry = cache.store(item["tokens"], state, state_nbytes(state), is_trimmable(state),
                            Priority(item["priority"]))
        if entry is not None:
            evaluate(state)
    return len(cache)

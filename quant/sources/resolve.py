"""MODEL argument -> a local checkpoint directory.

MODEL is a local directory or a Hugging Face repo id. A repo id is fetched with
huggingface_hub (which honours HF_HOME, HF_TOKEN and HF_HUB_OFFLINE), and only the
files a checkpoint needs: config, safetensors weights, tokenizer and chat templates.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

# What a served model needs; everything else in a repo (PyTorch .bin twins of the
# safetensors, ONNX exports, images) is skipped, which can save gigabytes.
CHECKPOINT_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer*",
    "*.model",  # sentencepiece vocabularies
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ResolveError(RuntimeError):
    """MODEL could not be turned into a local checkpoint; the message is one clear line."""


@dataclass(frozen=True)
class ResolvedModel:
    """A local checkpoint directory and what identifies its content."""

    path: Path
    source: str  # the repo id, or the absolute path of a local directory
    revision: str  # the commit of a hub snapshot, or a hash of the weights' metadata

    @property
    def is_mlx_quantized(self) -> bool:
        return "quantization" in read_config(self.path)


def read_config(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ResolveError(f"{model_dir} is not a model directory: it has no config.json")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ResolveError(f"{config_path} is not valid JSON: {exc}") from exc


def content_revision(model_dir: Path) -> str:
    """A hash of what defines a local checkpoint's weights, cheap to compute.

    Hashes config.json and each safetensors file's name, size and header (shapes,
    dtypes, offsets), not the gigabytes of data: an edit that keeps every size and
    header identical is not detected, a re-export or re-download is.
    """
    digest = hashlib.sha256()
    digest.update((model_dir / "config.json").read_bytes())
    for shard in sorted(model_dir.glob("*.safetensors")):
        with shard.open("rb") as handle:
            head = handle.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = handle.read(min(header_len, 100_000_000))
        digest.update(shard.name.encode())
        digest.update(shard.stat().st_size.to_bytes(8, "little"))
        digest.update(header)
    return "sha256-" + digest.hexdigest()[:16]


def looks_like_repo_id(model: str) -> bool:
    """True for 'org/name' that is not also a local path."""
    return bool(_REPO_ID.match(model)) and not Path(model).expanduser().exists()


def resolve_model(
    model: str,
    revision: str | None = None,
    *,
    gguf_file: str | None = None,
    tokenizer: str | None = None,
    sidecar_root: Path | None = None,
) -> ResolvedModel:
    """Turn MODEL (local directory or Hugging Face repo id) into a local checkpoint.

    GGUF weights (a .gguf file, a folder of them, or a repo with `gguf_file`) become a
    source folder under `sidecar_root` (see gguf_model.py)."""
    from .gguf_model import wants_gguf

    if wants_gguf(model, gguf_file):
        return _resolve_gguf(model, revision, gguf_file, tokenizer, sidecar_root)
    if tokenizer:
        raise ResolveError("--tokenizer applies to GGUF models only")
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ResolveError(f"{model} is a file; MODEL must be a directory or a repo id")
        local = local.resolve()
        read_config(local)  # fail early and clearly on a directory that is no model
        return ResolvedModel(local, str(local), content_revision(local))
    if not looks_like_repo_id(model):
        raise ResolveError(
            f"{model!r} is neither an existing directory nor a Hugging Face repo id (org/name)"
        )
    path = Path(_download(model, revision))
    if not (path / "config.json").is_file() and any(path.glob("*.gguf")):
        raise ResolveError(f"{model} holds GGUF weights: pick them with --gguf-file PATTERN")
    read_config(path)
    # A hub snapshot lives in .../snapshots/<commit>: the commit names the content.
    return ResolvedModel(path, model, path.name)


def _download(
    repo_id: str, revision: str | None, patterns: list[str] = CHECKPOINT_FILE_PATTERNS
) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns
        )
    except GatedRepoError as exc:
        raise ResolveError(
            f"{repo_id} is gated: accept its licence on huggingface.co and set HF_TOKEN"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ResolveError(
            f"no Hugging Face repo named {repo_id!r} (or it is private: set HF_TOKEN)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ResolveError(f"{repo_id} has no revision {revision!r}") from exc
    except LocalEntryNotFoundError as exc:
        raise ResolveError(
            f"{repo_id} is not in the local Hugging Face cache and cannot be downloaded "
            "(offline, HF_HUB_OFFLINE=1, or no network)"
        ) from exc
    except OSError as exc:
        raise ResolveError(f"downloading {repo_id} failed: {exc}") from exc


def _resolve_gguf(
    model: str,
    revision: str | None,
    gguf_file: str | None,
    tokenizer: str | None,
    sidecar_root: Path | None,
) -> ResolvedModel:
    from .gguf_file import GGUFError
    from .gguf_model import download_gguf, first_gguf, prepare_source

    if sidecar_root is None:
        from ..cache import default_cache_root

        sidecar_root = default_cache_root()
    try:
        local = Path(model).expanduser()
        if local.exists():
            first = first_gguf(model, gguf_file)
            source = str(first)
        elif looks_like_repo_id(model):
            folder = download_gguf(model, gguf_file or "*", revision)
            first = first_gguf(str(folder), gguf_file)
            source = f"{model}:{first.relative_to(folder)}"
        else:
            raise ResolveError(f"{model!r} is neither an existing path nor a Hugging Face "
                               "repo id (org/name)")
        path, content = prepare_source(first, sidecar_root / "gguf-sources", tokenizer)
    except GGUFError as exc:
        raise ResolveError(str(exc)) from None
    return ResolvedModel(path, source, content)

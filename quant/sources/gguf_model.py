"""MODEL given as GGUF -> a model directory the rest of the pipeline reads.

MODEL may be a .gguf file (the first shard of a split set), a folder holding GGUF
files, or a hub repo with GGUF weights plus `--gguf-file PATTERN` (only the
matching shards are downloaded). Each becomes a small *source folder*:

    config.json                (from the GGUF metadata, gguf_config.py)
    tokenizer.json, tokenizer_config.json
                               (rebuilt from tokenizer.ggml.*, or copied from --tokenizer)
    generation_config.json     (eos ids)
    .gguf_source.json          (the GGUF files it stands for; read by open_checkpoint)

written once under <cache>/gguf-sources/<identity>/ and published by rename, so
analysis, conversion and the cache see an ordinary model directory whose weights
are read, streamed, from the GGUF files themselves.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .gguf_file import SPLIT_NAME, GGUFError
from .gguf_source import GGUFCheckpoint, check_against_model, open_gguf_checkpoint
from .gguf_tokenizer import build_tokenizer_files, eos_token_ids

POINTER = ".gguf_source.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
FORMAT = "1"  # bump when the source folder's content would change for the same GGUF


def is_gguf_source(model_dir: Path) -> bool:
    return (Path(model_dir) / POINTER).is_file()


def open_source(model_dir: Path) -> GGUFCheckpoint:
    pointer = json.loads((Path(model_dir) / POINTER).read_text())
    return open_gguf_checkpoint(pointer["first"], root=Path(model_dir))


def source_bytes(model_dir: Path) -> int:
    if not is_gguf_source(model_dir):
        return 0
    pointer = json.loads((Path(model_dir) / POINTER).read_text())
    return sum(Path(p).stat().st_size for p in pointer["files"] if Path(p).is_file())


def wants_gguf(model: str, gguf_file: str | None) -> bool:
    path = Path(model).expanduser()
    if gguf_file:
        return True
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf"))


def pick_first_shard(folder: Path, pattern: str | None) -> Path:
    """The one GGUF model in `folder` (matching `pattern`): its file or first shard."""
    # Vision projectors and importance matrices ship beside the weights in GGUF too.
    files = sorted(p for p in folder.rglob("*.gguf") if p.is_file()
                   and not p.name.lower().startswith(("mmproj", "imatrix")))
    if pattern:
        pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        files = [p for p in files if fnmatch.fnmatch(str(p.relative_to(folder)), pat)]
    models: dict[str, Path] = {}
    for p in files:
        match = SPLIT_NAME.match(p.name)
        if match is None:
            models[str(p)] = p
            continue
        first = p.with_name(f"{match['stem']}-00001-of-{match['count']}.gguf")
        if not first.is_file():
            raise GGUFError(f"incomplete GGUF split set: {first.name} is missing in {p.parent}")
        models[str(first)] = first
    if not models:
        what = f" matching {pattern!r}" if pattern else ""
        raise GGUFError(f"no GGUF file{what} in {folder}")
    if len(models) > 1:
        names = ", ".join(sorted(str(p.relative_to(folder)) for p in models.values())[:6])
        raise GGUFError(f"{folder} holds {len(models)} GGUF models ({names}); pick one with "
                        "--gguf-file PATTERN")
    return next(iter(models.values()))


def download_gguf(repo_id: str, pattern: str, revision: str | None) -> Path:
    """Download only the shards of `repo_id` matching the pattern (and small side files)."""
    from .resolve import ResolveError, _download

    pat = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    patterns = [pat if pat.endswith(".gguf") else f"{pat}.gguf", f"{pat}/*.gguf"]
    try:
        return Path(_download(repo_id, revision, patterns + ["*.json", "*.jinja"]))
    except ResolveError as exc:
        raise GGUFError(str(exc)) from None


def tokenizer_dir(tokenizer: str) -> Path:
    """--tokenizer: a local folder, or a hub id whose tokenizer files are fetched."""
    local = Path(tokenizer).expanduser()
    if local.is_dir():
        folder = local
    else:
        from .resolve import ResolveError, _download, looks_like_repo_id

        if not looks_like_repo_id(tokenizer):
            raise GGUFError(f"--tokenizer {tokenizer!r} is neither a folder nor a hub repo id")
        try:
            folder = Path(_download(tokenizer, None, list(TOKENIZER_FILES)))
        except ResolveError as exc:
            raise GGUFError(str(exc)) from None
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise GGUFError(f"--tokenizer {tokenizer}: no tokenizer.json or tokenizer.model there")
    return folder


def _tokenizer_identity(folder: Path | None) -> str:
    if folder is None:
        return "from-gguf"
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


def prepare_source(first: Path, sidecar_root: Path, tokenizer: str | None = None
                   ) -> tuple[Path, str]:
    """(source folder, revision) for the GGUF model whose first file is `first`.
    Everything cheap is checked here: headers, shards, names, shapes, metadata,
    the tokenizer. Raises GGUFError (one line)."""
    from .checkpoint import CheckpointError

    try:
        ckpt = open_gguf_checkpoint(first)
    except CheckpointError as exc:
        raise GGUFError(str(exc)) from None
    check_against_model(ckpt)
    tok_folder = tokenizer_dir(tokenizer) if tokenizer else None
    revision = "gguf-" + hashlib.sha256(
        f"{ckpt.fingerprint()}/{_tokenizer_identity(tok_folder)}/{FORMAT}".encode()
    ).hexdigest()[:16]
    target = sidecar_root / revision
    if (target / POINTER).is_file():
        _repoint(target, ckpt)  # same content, but the files may have moved since
        return target, revision
    sidecar_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{revision}.partial-", dir=sidecar_root))
    try:
        _write_source(staging, ckpt, tok_folder)
        try:
            os.replace(staging, target)
        except OSError:  # another process published it first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target, revision


def _pointer(ckpt: GGUFCheckpoint) -> dict:
    files = ckpt.model.files
    return {"first": str(files[0]), "files": [str(p) for p in files]}


def _repoint(folder: Path, ckpt: GGUFCheckpoint) -> None:
    """A source folder is keyed by content: when the GGUF it was made from was moved,
    copied or deleted and the same content turns up elsewhere, point at the new files."""
    pointer = _pointer(ckpt)
    try:
        if json.loads((folder / POINTER).read_text()) == pointer:
            return
    except (OSError, ValueError):
        pass
    staging = folder / f".{POINTER}.{os.getpid()}.tmp"
    staging.write_text(json.dumps(pointer, indent=2))
    os.replace(staging, folder / POINTER)


def _write_source(folder: Path, ckpt: GGUFCheckpoint, tok_folder: Path | None) -> None:
    model = ckpt.model
    (folder / "config.json").write_text(json.dumps(ckpt.config, indent=2))
    if tok_folder is None:
        files = build_tokenizer_files(model)
        for name, data in files.items():
            (folder / name).write_text(json.dumps(data, ensure_ascii=False))
    else:
        for name in TOKENIZER_FILES:
            if (tok_folder / name).is_file():
                shutil.copyfile(tok_folder / name, folder / name)
    eos = eos_token_ids(model)
    if eos:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    (folder / POINTER).write_text(json.dumps(_pointer(ckpt), indent=2))


def first_gguf(model: str, gguf_file: str | None) -> Path:
    """The first GGUF file a local MODEL (file or folder) names."""
    path = Path(model).expanduser().resolve()
    if path.is_file():
        if gguf_file and not fnmatch.fnmatch(path.name, f"*{gguf_file}*"):
            raise GGUFError(f"{path.name} does not match --gguf-file {gguf_file!r}")
        return path
    return pick_first_shard(path, gguf_file)

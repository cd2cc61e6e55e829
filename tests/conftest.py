"""Shared pytest fixtures: tiny real checkpoints, written once per test session."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from swan_serve.quant.fixtures import write_checkpoint
from swan_serve.quant.fixtures.tokenizer import shared_dir


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_checkpoint(arch="qwen3", **write_checkpoint_kwargs) -> checkpoint folder.

    Each distinct set of arguments is written once per session and shared by
    every test that asks for it, so treat the folder as read-only.
    """
    written: dict[str, Path] = {}

    def make(arch: str = "qwen3", **kwargs: object) -> Path:
        key = json.dumps([arch, kwargs], sort_keys=True, default=str)
        if key not in written:
            written[key] = write_checkpoint(tmp_path_factory.mktemp(arch), arch, **kwargs)
        return written[key]

    return make


@pytest.fixture(scope="session")
def qwen3_checkpoint(tiny_checkpoint: Callable[..., Path]) -> Path:
    """The default tiny Qwen3 checkpoint (real Qwen3 tokenizer when ../shared has it)."""
    return tiny_checkpoint("qwen3")


@pytest.fixture(scope="session")
def shared_models_dir() -> Path:
    """../shared/models (real Qwen configs and indexes); skips the test when absent."""
    models = shared_dir() / "models"
    if not models.is_dir():
        pytest.skip(f"real Qwen metadata not found at {models} (set SWAN_SHARED_DIR)")
    return models

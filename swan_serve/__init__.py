"""swan-serve: data-free mixed-precision quantization (SWAN) and an OpenAI-compatible MLX server."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("swan-serve")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

# The small Qwen3-architecture model this project trains itself
# (scripts/train_demo_model.py); served when no model is named.
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"

"""TOML presets (allocation recipes, metric weights, server defaults).

A package only so that the presets install with the code; `preset_path` finds one.
"""

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)

CONFIG_DIR = Path(__file__).resolve().parent


def preset_path(name: str) -> Path:
    """Path of the bundled preset `name` (with or without the .toml suffix)."""
    path = CONFIG_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise FileNotFoundError(f"no preset named {name!r}; bundled presets: {', '.join(known)}")
    return path


def load_toml_as(path: Path, model: type[Model], error: type[Exception], what: str) -> Model:
    """Read a TOML file into a pydantic model; any problem is one `error` line naming
    the file and, for a bad value, where in it."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise error(f"bad {what} {path}: {where}: {first['msg']}") from None

"""TOML presets (allocation recipes, metric weights, server defaults).

A package only so that the presets install with the code; `preset_path` finds one.
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def preset_path(name: str) -> Path:
    """Path of the bundled preset `name` (with or without the .toml suffix)."""
    path = CONFIG_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise FileNotFoundError(f"no preset named {name!r}; bundled presets: {', '.join(known)}")
    return path

"""A candidate quantization setting: (bits, group) for affine, (bits, group, mode) otherwise.

Affine settings stay 2-tuples so that sensitivity files and manifests written before
modes existed ("4/64") still load and mean the same; a microscaling mode adds its
name ("4/32/mxfp4"). Bits per weight count what is stored: a 16-bit scale and bias
per affine group, one 8-bit scale per mxfp4/mxfp8/nvfp4 group.
"""

from __future__ import annotations

from . import modes
from .affine import bits_per_weight

Setting = tuple  # (bits, group_size) or (bits, group_size, mode)
MODES = ("affine", *modes.FLOAT_MODES)


def make(bits: int, group_size: int, mode: str = "affine") -> Setting:
    return (bits, group_size) if mode == "affine" else (bits, group_size, mode)


def mode_of(s: Setting) -> str:
    return s[2] if len(s) > 2 else "affine"


def bpw(s: Setting) -> float:
    mode = mode_of(s)
    return bits_per_weight(s[0], s[1]) if mode == "affine" else modes.bits_per_weight(mode)


def label(s: Setting) -> str:
    return "/".join(str(v) for v in s)


def parse(text: str) -> Setting:
    parts = text.split("/")
    return make(int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else "affine")


def float_mode_settings(mode_names: list[str], in_dim: int, min_bits: int = 2) -> list[Setting]:
    """The microscaling candidates of mode_names that a width-in_dim module can take."""
    return [make(modes.BITS[m], modes.GROUP_SIZE[m], m) for m in mode_names
            if m != "affine" and in_dim % 32 == 0 and modes.BITS[m] >= min_bits]

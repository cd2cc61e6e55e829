"""The pre-scaling flags shared by swan-quant convert and swan-serve, and their defaults.

With input moments (an imatrix, or a moments file written by quant/moments.py's
`save`) AWQ pre-scaling is on unless --no-awq; --equalize asks for the data-free
equaliser instead (it is off by default: on the demo model it did not measure
better at equal bytes, README "Pre-scaling").
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Literal

import numpy as np

Prescale = Literal["awq", "equalize"]


class MomentsFileError(ValueError):
    """A moments file that cannot be read; one line for the user."""


def add_prescale_flags(add) -> None:
    """Declare --moments, --no-awq and --equalize with `add` (parser.add_argument)."""
    add("--moments", default=None, metavar="NPZ",
        help="per-input-channel second moments E[x^2] by HF weight name (.npz, as "
             "swan_serve.quant.moments.save writes): weight the fit and turn on AWQ "
             "pre-scaling")
    add("--no-awq", action="store_true",
        help="with moments, do not fold AWQ pre-scales into the weights")
    add("--equalize", action="store_true",
        help="fold data-free per-channel scales (row/column std balancing) into the "
             "weights before quantizing; replaces AWQ")


def prescale_choice(has_moments: bool, no_awq: bool = False, equalize: bool = False
                    ) -> Prescale | None:
    if equalize:
        return "equalize"
    if has_moments and not no_awq:
        return "awq"
    return None


def load_moments_file(path: str | Path) -> dict[str, np.ndarray]:
    """{HF weight name: float32 [in] or [n_experts, in]} from an .npz file."""
    from .moments import load

    path = Path(path).expanduser()
    try:
        out = load(path)  # the reader of what moments.save writes
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise MomentsFileError(f"cannot read moments file {path}: {exc}") from None
    bad = [k for k, v in out.items() if v.ndim not in (1, 2) or not np.all(np.isfinite(v))
           or np.any(v < 0)]
    if not out or bad:
        what = f"{bad[0]} is not a finite, non-negative [in] or [experts, in] array" if bad \
            else "it holds no arrays"
        raise MomentsFileError(f"bad moments file {path}: {what}")
    return out

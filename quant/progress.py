"""Progress of long work: a bar on a terminal, plain log lines otherwise, and a callback.

Every long phase (download, analysis, conversion) reports through `phase_progress`, so
the same code feeds a tqdm bar for a person at a terminal, a line every few seconds
for a log file or CI, and `on_update(phase, fraction)` for whoever else is watching
(swan-serve's /health reports it while the model is loading).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

# (phase, fraction done in [0, 1]); fraction is monotone within a phase.
ProgressCallback = Callable[[str, float], None]

_LOG_EVERY_SECONDS = 10.0


class PhaseProgress:
    """A counter with a total, shown as a bar or as log lines, mirrored to a callback."""

    def __init__(
        self,
        phase: str,
        total: float,
        unit: str,
        enabled: bool,
        on_update: ProgressCallback | None,
        stream: Any = None,
    ) -> None:
        self.phase = phase
        self.total = max(float(total), 1e-9)
        self.done = 0.0
        self.unit = unit
        self._on_update = on_update
        self._stream = stream or sys.stderr
        self._bar = None
        self._log_lines = False
        self._started = time.monotonic()
        self._last_log = self._started
        if enabled and _is_terminal(self._stream):
            self._bar = tqdm(total=total, desc=phase, unit=unit, unit_scale=True,
                             file=self._stream, dynamic_ncols=True)
        elif enabled:
            self._log_lines = True
        self._notify()

    def update(self, amount: float) -> None:
        self.done = min(self.total, self.done + amount)
        if self._bar is not None:
            self._bar.update(amount)
        if self._log_lines and time.monotonic() - self._last_log >= _LOG_EVERY_SECONDS:
            self._log()
        self._notify()

    def set_postfix(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._log_lines:
            self._log(final=True)

    def __enter__(self) -> PhaseProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _notify(self) -> None:
        if self._on_update is not None:
            self._on_update(self.phase, self.done / self.total)

    def _log(self, final: bool = False) -> None:
        self._last_log = now = time.monotonic()
        elapsed = max(now - self._started, 1e-9)
        fraction = self.done / self.total
        amount = f"{_size(self.done, self.unit)} of {_size(self.total, self.unit)}"
        rate = f"{_size(self.done / elapsed, self.unit)}/s"
        if final:
            line = f"{self.phase}: done, {_size(self.done, self.unit)} in {elapsed:.0f} s ({rate})"
        else:
            eta = f", about {elapsed / fraction - elapsed:.0f} s left" if fraction > 0 else ""
            line = f"{self.phase}: {100 * fraction:.0f}% ({amount}, {rate}{eta})"
        print(line, file=self._stream, flush=True)


def _size(amount: float, unit: str) -> str:
    return tqdm.format_sizeof(amount, suffix=unit, divisor=1024 if unit == "B" else 1000)


def phase_progress(
    phase: str,
    total: float,
    unit: str = "it",
    enabled: bool = True,
    on_update: ProgressCallback | None = None,
) -> PhaseProgress:
    return PhaseProgress(phase, total, unit, enabled, on_update)


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())

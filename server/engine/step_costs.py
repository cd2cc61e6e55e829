"""What one generation step costs on this device, learnt from the steps the server runs.

A step is one forward pass of the running batch: a decode token for each of the D sequences
that are generating, plus one chunk of prompt for the sequences still reading theirs. Its
time is modelled as

    seconds = fixed + per_row * D + per_token * N + per_pair * P

N: the prompt tokens of the step as the batch computes them (every row padded to the
longest), P: the attention pairs those tokens form with the context before them and with
each other (the part of a prefill that grows with a cached prefix). The coefficients are
fitted by least squares over recent steps (older ones weigh less), kept non-negative.

Nothing here is set per device: where a step's fixed cost is large and attention cheap (a
GPU reading a big model's weights) and where attention dominates (MLX's CPU kernels), the
fit says so, and the prefill scheduler (prefill_schedule.py) decides from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Each step's weight decays by this much per later step: about the last hundred count.
_FORGET = 0.99
# Before this many steps with prompt tokens the fit is not trusted.
_MIN_PREFILL_STEPS = 3
# Keeps the normal equations solvable when a feature has barely varied yet.
_RIDGE = 1e-9


@dataclass(frozen=True)
class PrefillWork:
    """Prompt tokens computed over a context already in the cache."""

    tokens: int
    context: int

    @property
    def pairs(self) -> float:
        """Attention pairs: each new token with the context and the new tokens up to it."""
        return self.tokens * (self.context + (self.tokens + 1) / 2)


def padded(rows: Sequence[PrefillWork]) -> tuple[float, float]:
    """(N, P) of one batched prefill chunk: BatchGenerator pads every row to the longest
    chunk and the longest context, so each row costs as much as the largest."""
    rows = [r for r in rows if r.tokens > 0]
    if not rows:
        return 0.0, 0.0
    largest = PrefillWork(max(r.tokens for r in rows), max(r.context for r in rows))
    return float(len(rows) * largest.tokens), len(rows) * largest.pairs


class StepCosts:
    """Running least-squares fit of step time on (1, D, N, P)."""

    def __init__(self, forget: float = _FORGET):
        self._forget = forget
        self._xtx = np.zeros((4, 4))
        self._xty = np.zeros(4)
        self._prefill_steps = 0
        self._coef: np.ndarray | None = None

    def observe(self, seconds: float, decode_rows: int, prefill: Sequence[PrefillWork]) -> None:
        tokens, pairs = padded(prefill)
        x = np.array([1.0, float(decode_rows), tokens, pairs])
        self._xtx = self._forget * self._xtx + np.outer(x, x)
        self._xty = self._forget * self._xty + x * seconds
        self._prefill_steps += tokens > 0
        self._coef = None

    @property
    def ready(self) -> bool:
        return self._prefill_steps >= _MIN_PREFILL_STEPS

    def coefficients(self) -> np.ndarray:
        """(fixed, per_row, per_token, per_pair) in seconds, all >= 0."""
        if self._coef is None:
            self._coef = _nonnegative_solve(self._xtx, self._xty)
        return self._coef

    def step_overhead(self, decode_rows: int) -> float:
        """What a step costs before any prompt tokens: its fixed part and the decode rows."""
        fixed, per_row, _, _ = self.coefficients()
        return float(fixed + per_row * decode_rows)

    def prefill_cost(self, work: PrefillWork) -> float:
        _, _, per_token, per_pair = self.coefficients()
        return float(per_token * work.tokens + per_pair * work.pairs)


def _nonnegative_solve(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """argmin ||Xc - y|| with c >= 0, from the normal equations: drop the most negative
    coefficient and solve again (four features: at most four rounds)."""
    scale = np.sqrt(np.diag(xtx))
    active = [i for i in range(len(xty)) if scale[i] > 0]
    coef = np.zeros(len(xty))
    while active:
        s = scale[active]
        a = xtx[np.ix_(active, active)] / np.outer(s, s) + _RIDGE * np.eye(len(active))
        solved = np.linalg.solve(a, xty[active] / s) / s
        if (solved >= 0).all():
            coef[active] = solved
            break
        del active[int(np.argmin(solved))]
    return coef

"""Multiple-choice knapsack: one option per unit, least total loss within a budget.

Solved by dynamic programming over units on the Pareto front of partial
solutions: after each unit, keep only the (cost, loss) states that no cheaper
state beats, dropping states that cannot fit even with the cheapest options of
the units still to come. That is exact. When a front grows past `max_states`
(large models with many distinct costs), it is thinned to the best state per
cost bucket of width budget / max_states, which keeps every cost exact and can
only miss the optimum by that bucket width per unit, i.e. a few thousandths of
a bit per weight. Cost: O(units x options x max_states), seconds in numpy.

(A Lagrangian relaxation alone, which takes the convex hull's upgrades in order
of loss saved per bit, is exact only at hull points: with a few big units, an
embedding in a small model, it can leave a large part of the budget unused.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_STATES = 1 << 16


@dataclass(frozen=True)
class Option:
    cost: float  # bits the unit takes with this option
    loss: float  # predicted loss with this option


class BudgetError(ValueError):
    """Even the cheapest options do not fit in the budget."""


def solve(
    units: list[list[Option]], budget: float, max_states: int = DEFAULT_MAX_STATES
) -> list[int]:
    """Index of the chosen option for each unit; total cost <= budget."""
    if any(not options for options in units):
        raise ValueError("every unit needs at least one option")
    cheapest = np.array([min(o.cost for o in options) for options in units], dtype=np.float64)
    rest = np.concatenate([np.cumsum(cheapest[::-1])[::-1], [0.0]])  # min cost of units u..
    slack = budget * 1e-12  # float noise in sums of large costs
    if rest[0] > budget + slack:
        raise BudgetError(f"the cheapest choice needs {rest[0]:.0f} bits, budget is {budget:.0f}")
    cost = np.zeros(1)
    loss = np.zeros(1)
    steps: list[tuple[np.ndarray, np.ndarray]] = []  # per unit: (parent state, option)
    for u, options in enumerate(units):
        o_cost = np.array([o.cost for o in options], dtype=np.float64)
        o_loss = np.array([o.loss for o in options], dtype=np.float64)
        all_cost = (cost[:, None] + o_cost[None, :]).ravel()
        all_loss = (loss[:, None] + o_loss[None, :]).ravel()
        index = np.flatnonzero(all_cost + rest[u + 1] <= budget + slack)
        index = _pareto(all_cost, all_loss, index)
        index = _thin(all_cost, index, budget / max_states) if len(index) > max_states else index
        cost, loss = all_cost[index], all_loss[index]
        steps.append((index // len(options), index % len(options)))
    state = int(np.argmin(loss))
    chosen = [0] * len(units)
    for u in range(len(units) - 1, -1, -1):
        parent, option = steps[u]
        chosen[u] = int(option[state])
        state = int(parent[state])
    return chosen


def total(units: list[list[Option]], chosen: list[int]) -> tuple[float, float]:
    """(cost, loss) of a choice."""
    cost = sum(units[u][i].cost for u, i in enumerate(chosen))
    loss = sum(units[u][i].loss for u, i in enumerate(chosen))
    return cost, loss


def _pareto(cost: np.ndarray, loss: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The states of `index` that every cheaper (or equally cheap) state loses to,
    sorted by cost."""
    order = index[np.lexsort((loss[index], cost[index]))]
    sorted_loss = loss[order]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], sorted_loss[:-1]]))
    return order[sorted_loss < best_before]


def _thin(cost: np.ndarray, index: np.ndarray, width: float) -> np.ndarray:
    """Per cost bucket keep the last (= lowest-loss) state of a cost-sorted front."""
    bucket = np.floor(cost[index] / width)
    last_of_bucket = np.concatenate([bucket[1:] != bucket[:-1], [True]])
    return index[last_of_bucket]

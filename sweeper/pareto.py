"""Pareto fronts of configs: which are non-dominated, a few spread along the front, and how
far a value breaks a constraint.

Pure functions over plain arrays, shared by the searcher (which configs a cell confirms) and
the analysis (`pareto_configs.csv`), so both call the same front and the same constraint
violation the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def oriented(values: Sequence[Sequence[float]], modes: Sequence[str]) -> np.ndarray:
    """The values as an (n, k) array in which larger is better in every column."""
    signs = np.array([1.0 if m == "max" else -1.0 for m in modes])
    arr = np.asarray(values, dtype=float).reshape(-1, len(signs))
    return arr * signs


def non_dominated(values: Sequence[Sequence[float]], modes: Sequence[str]) -> np.ndarray:
    """Mask of the rows no other row dominates (at least as good in every objective and
    better in one). Rows with a NaN are never on the front; equal rows all are."""
    x = oriented(values, modes)
    ok = ~np.isnan(x).any(axis=1)
    front = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        others = x[ok]
        dominated = ((others >= x[i]).all(axis=1) & (others > x[i]).any(axis=1)).any()
        front[i] = not dominated
    return front


def spread(values: Sequence[Sequence[float]], modes: Sequence[str], k: int) -> list[int]:
    """Up to ``k`` row indices of a front, spread along it: the rows sorted by the first
    objective (best first, ties by the next ones), then ``k`` evenly spaced ranks, both ends
    included. Deterministic: equal inputs give equal picks."""
    x = oriented(values, modes)
    n = len(x)
    if n <= k:
        return list(range(n))
    # np.lexsort sorts by its last key first: best first in objective 0, then 1, ...
    order = np.lexsort(tuple(-x[:, j] for j in reversed(range(x.shape[1]))))
    ranks = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]
    return [int(order[r]) for r in ranks]


def violation(value: float, low: float | None, high: float | None) -> float:
    """How far `value` lies outside [low, high] (either may be open); <= 0 inside, which is
    Optuna's sign for a satisfied constraint."""
    over = [low - value] if low is not None else []
    over += [value - high] if high is not None else []
    return max(over, default=-np.inf)

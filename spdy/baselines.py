"""One-shot baselines for the same time budget: uniform and global magnitude.

Both only choose a level of the sparsity grid per layer (the table's first ``|S|``
columns, see :class:`~spdy.types.LatencyTable`; N:M columns are not theirs to take); the
pruned weights come from the same database as SPDY's, so a comparison isolates the choice
of profile.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from spdy.choices import grid_choices
from spdy.errors import InfeasibleBudgetError, InvalidInputError
from spdy.types import LatencyTable, Solution

BASELINES = ("uniform", "global")


def check_names(names: Iterable[str]) -> None:
    """Raise :class:`InvalidInputError` for a name that is not one of :data:`BASELINES`."""
    for b in names:
        if b not in BASELINES:
            raise InvalidInputError(f"unknown baseline {b!r}; expected one of {', '.join(BASELINES)}")


def _target_time(table: LatencyTable, speedup: float) -> float:
    if table.choices[:len(table.grid)] != grid_choices(table.grid):
        raise InvalidInputError("the baselines choose grid levels: the table's first columns must be the grid's levels")
    return table.dense_total_s / speedup * (1 + 1e-12)


def uniform(table: LatencyTable, speedup: float) -> Solution:
    """The lowest single level that, applied to every layer, meets the budget."""
    target = _target_time(table, speedup)
    L = len(table.layers)
    for i in range(len(table.grid)):
        levels = np.full(L, i, dtype=np.int64)
        if table.predicted_time(levels) <= target:
            return table.solution(levels)
    best = max(table.dense_total_s / table.predicted_time(np.full(L, i)) for i in range(len(table.grid)))
    raise InfeasibleBudgetError(
        f"no single sparsity level reaches {speedup:g}x for every layer; the best uniform level gives {best:.3f}x",
        max_speedup=best,
    )


def _levels_for_threshold(tau: float, weights: list[np.ndarray], grid: np.ndarray) -> np.ndarray:
    """Per layer: the fraction of |w| below tau, rounded up to the next grid level."""
    out = np.empty(len(weights), dtype=np.int64)
    for l, w in enumerate(weights):
        s = np.searchsorted(w, tau, side="left") / len(w)
        out[l] = min(int(np.searchsorted(grid, s - 1e-12, side="left")), len(grid) - 1)
    return out


def global_magnitude(table: LatencyTable, weights: Mapping[str, np.ndarray], speedup: float) -> Solution:
    """One magnitude threshold across all layers, the smallest that meets the budget.

    Each layer's sparsity is the fraction of its weights below the threshold, rounded
    up to the grid; the threshold is found by bisection over the sorted magnitudes.
    """
    target = _target_time(table, speedup)
    grid = table.grid.as_array()
    mags = [np.sort(np.abs(np.asarray(weights[name], dtype=np.float32)).ravel()) for name in table.layers]
    allm = np.unique(np.concatenate(mags))
    lo, hi = 0, len(allm) - 1
    top = _levels_for_threshold(float(np.nextafter(allm[hi], np.inf)), mags, grid)
    if table.predicted_time(top) > target:
        most = table.dense_total_s / table.predicted_time(top)
        raise InfeasibleBudgetError(
            f"global magnitude pruning cannot reach {speedup:g}x with this grid (at most {most:.3f}x)", max_speedup=most,
        )
    # smallest index whose threshold meets the budget (time is monotone non-increasing in tau
    # only up to latency noise, so the bisection gives a threshold that meets it, not the least)
    while lo < hi:
        mid = (lo + hi) // 2
        if table.predicted_time(_levels_for_threshold(float(allm[mid]), mags, grid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    levels = _levels_for_threshold(float(allm[lo]), mags, grid)
    if table.predicted_time(levels) > target:
        levels = top
    return table.solution(levels)

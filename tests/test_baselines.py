from __future__ import annotations

import numpy as np
import pytest

from spdy import baselines
from spdy.errors import InfeasibleBudgetError
from spdy.grid import spdy_grid
from spdy.types import LatencyTable

GRID = spdy_grid(9)


def table(base: float = 1e-4) -> LatencyTable:
    dens = 1 - GRID.as_array()
    sizes = np.array([1.0, 2.0, 4.0])
    return LatencyTable(["a", "b", "c"], GRID, sizes[:, None] * dens[None, :] * 1e-3, base)


def test_uniform_is_lowest_level_meeting_budget() -> None:
    t = table()
    sol = baselines.uniform(t, 2.0)
    i = int(sol.levels[0])
    assert np.all(sol.levels == i) and sol.predicted_speedup >= 2.0
    assert t.dense_total_s / t.predicted_time(np.full(3, i - 1)) < 2.0


def test_uniform_infeasible() -> None:
    with pytest.raises(InfeasibleBudgetError, match="best uniform level"):
        baselines.uniform(table(base=1e-2), 2.0)


def test_global_magnitude_threshold() -> None:
    rng = np.random.default_rng(0)
    # layer b has small weights: one global threshold prunes it hardest
    w = {"a": rng.normal(0, 1.0, (8, 8)), "b": rng.normal(0, 0.1, (8, 16)), "c": rng.normal(0, 1.0, (16, 16))}
    t = table()
    sol = baselines.global_magnitude(t, w, 2.0)
    assert sol.predicted_speedup >= 2.0
    assert sol.sparsities[1] >= sol.sparsities[0] and sol.sparsities[1] >= sol.sparsities[2]
    # equal-magnitude layers get (nearly) equal levels
    assert abs(int(sol.levels[0]) - int(sol.levels[2])) <= 2

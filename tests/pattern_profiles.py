"""A toy profile with N:M pattern times, for the tests of the tables, the DP and the search over choices."""

from __future__ import annotations

import math

import numpy as np

from spdy.grid import SparsityGrid, spdy_grid
from spdy.profile import Profile
from spdy.types import LatencyTable, LayerSpec

INF = math.inf


def make_profile(L: int = 3, grid: SparsityGrid | None = None, patterns=("2:4", "4:8"), seed: int = 0) -> Profile:
    """``L`` layers of a 4-level grid (level 1 as slow as dense); 2:4 at 0.6 x dense on every
    layer but layer 0 (no kernel there), no kernel for any other pattern."""
    grid = grid or spdy_grid(4)
    rng = np.random.default_rng(seed)
    dense = rng.uniform(1.0, 2.0, L)
    times = dense[:, None] * np.linspace(1.0, 0.3, len(grid))[None, :]
    times[:, 1] = dense  # level 1 runs in the dense format: same time as dense
    pt = np.full((L, len(patterns)), INF)
    pf = [["" for _ in patterns] for _ in range(L)]
    for i in range(L):
        if "2:4" in patterns and i != 0:  # layer 0 has no 2:4 kernel
            k = patterns.index("2:4")
            pt[i, k] = 0.6 * dense[i]
            pf[i][k] = "2:4"
    specs = [LayerSpec(f"l{i}", "linear", (64, 64), (1, 8, 64)) for i in range(L)]
    table = LatencyTable([s.name for s in specs], grid, times, 0.5, {"gpu": "test"})
    formats = tuple(("dense",) * 2 + ("csr",) * (len(grid) - 2) for _ in range(L))
    return Profile(table, backend="torch-cuda", model="toy", specs=specs, formats=formats, patterns=tuple(patterns),
                   pattern_times=pt, pattern_formats=tuple(tuple(r) for r in pf), pattern_spread=np.zeros((L, len(patterns))))

from __future__ import annotations

import numpy as np
import pytest

from spdy.errors import InvalidInputError
from spdy.grid import DEFAULT_GRID, SparsityGrid, spdy_grid


def test_default_grid_is_spdys() -> None:
    lv = DEFAULT_GRID.as_array()
    assert len(lv) == 42 and lv[0] == 0.0
    assert lv[1] == pytest.approx(0.40) and lv[-1] == pytest.approx(0.99)
    density = 1 - lv[1:]
    ratios = density[1:] / density[:-1]
    assert np.allclose(ratios, ratios[0])  # constant fraction of remaining weights kept per step
    # the published grid, as listed in SPDY's timing files (4 decimals)
    assert lv[2] == pytest.approx(0.4584, abs=1e-4) and lv[-2] == pytest.approx(0.9889, abs=1e-4)


def test_custom_grid_and_roundtrip() -> None:
    g = spdy_grid(5, 0.5, 0.9)
    assert len(g) == 6 and g[1] == pytest.approx(0.5) and g[-1] == pytest.approx(0.9)
    assert SparsityGrid.from_json(g.to_json()) == g
    assert g.index_of(0.9) == 5


@pytest.mark.parametrize("levels", [(), (0.1, 0.5), (0.0, 0.5, 0.4), (0.0, 1.0), (0.0, float("nan"))])
def test_bad_grids(levels) -> None:
    with pytest.raises(InvalidInputError):
        SparsityGrid(levels)

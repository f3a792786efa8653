"""The DP's table and its answer: columns of choices (grid levels, N:M patterns), solutions of the table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from spdy.choices import Choice, grid_choices
from spdy.errors import InvalidInputError
from spdy.grid import spdy_grid
from spdy.types import LatencyTable, Solution

INF = math.inf
GRID = spdy_grid(2)
NM = (Choice.dense(), Choice.nm("2:4"))


def test_a_table_over_the_grid_has_the_grids_levels_as_columns() -> None:
    t = LatencyTable(("a", "b"), GRID, [[1.0, 0.6, 0.3], [2.0, 1.0, 0.5]], 0.5)
    assert t.choices == grid_choices(GRID) and t.is_grid and t.patterns() == ()
    np.testing.assert_array_equal(t.positions(), [0.0, 1.0, 2.0])
    assert t.dense_total_s == 3.5 and t.max_speedup() == pytest.approx(3.5 / 1.3)


def test_table_columns_are_checked() -> None:
    with pytest.raises(InvalidInputError, match="column 0"):
        LatencyTable(("a",), GRID, [[1.0, 1.0]], 0.0, choices=NM[::-1])
    with pytest.raises(InvalidInputError, match="no dense time"):
        LatencyTable(("a",), GRID, [[INF, 1.0]], 0.0, choices=NM)
    with pytest.raises(InvalidInputError, match="non-finite"):
        LatencyTable(("a",), GRID, [[1.0, np.nan]], 0.0, choices=NM)
    with pytest.raises(InvalidInputError, match=">= 0"):
        LatencyTable(("a",), GRID, [[1.0, -INF]], 0.0, choices=NM)
    with pytest.raises(InvalidInputError, match="levels per layer"):
        LatencyTable(("a",), GRID, [[1.0, 1.0, 1.0]], 0.0, choices=NM)
    with pytest.raises(InvalidInputError, match="not a level"):
        LatencyTable(("a",), GRID, [[1.0, 1.0]], 0.0, choices=(Choice.dense(), Choice("unstructured", 0.3, 1)))
    with pytest.raises(InvalidInputError, match="unique"):
        LatencyTable(("a",), GRID, [[1.0, 1.0]], 0.0, choices=(Choice.dense(), Choice.dense()))
    with pytest.raises(InvalidInputError, match="formats"):
        LatencyTable(("a",), GRID, [[1.0, 1.0]], 0.0, choices=NM, formats=(("dense",),))


def test_unavailable_choices_and_the_columns_of_a_layer() -> None:
    t = LatencyTable(("a", "b"), GRID, [[1.0, INF], [1.0, 0.5]], 0.0, choices=NM,
                     formats=(("dense", ""), ("dense", "2:4")))
    assert not t.is_grid and t.patterns() == ("2:4",) and t.pattern_layers() == {"2:4": 1}
    assert t.available.tolist() == [[True, False], [True, True]]
    assert t.max_speedup() == pytest.approx(2 / 1.5)
    with pytest.raises(InvalidInputError, match=r"\['a'\] get a choice they do not have"):
        t.choices_of([1, 1])
    assert t.choices_of([0, 1]) == {"a": Choice.dense(), "b": Choice.nm("2:4")}
    assert t.column_of(Choice.nm("2:4")) == 1
    with pytest.raises(InvalidInputError, match="not a column"):
        t.column_of(Choice.nm("4:8"))
    # 2:4 at 50 % sits between the grid's 0 % and 40 % ... 99 % levels
    assert 1.0 < t.positions()[1] < 2.0


def test_a_solution_of_the_table_names_each_layers_choice_and_format() -> None:
    t = LatencyTable(("a", "b"), GRID, [[1.0, INF], [1.0, 0.5]], 0.25, choices=NM,
                     formats=(("dense", ""), ("dense", "2:4")))
    sol = t.solution([0, 1], total_error=0.1)
    assert sol.choices == NM and sol.formats == ("dense", "2:4") and sol.sparsities.tolist() == [0.0, 0.5]
    assert sol.predicted_time_s == 1.75 and sol.predicted_speedup == pytest.approx(2.25 / 1.75)
    assert sol.as_choices() == {"a": Choice.dense(), "b": Choice.nm("2:4")} and sol.as_dict() == {"a": 0.0, "b": 0.5}
    assert sol.pattern_counts() == {"dense": 1, "2:4": 1}
    js = json.loads(json.dumps(sol.to_json()))
    assert js["layers"]["b"] == {"pattern": "2:4", "sparsity": 0.5, "level": 0, "format": "2:4"}
    assert js["levels"] == {"a": 0.0, "b": 0.5} and js["level_index"] == {"a": 0, "b": 1}
    assert js["patterns"] == {"dense": 1, "2:4": 1}


def test_a_solution_over_grid_levels_reads_its_choices_from_the_levels() -> None:
    sol = Solution(("a", "b"), np.array([0, 2]), GRID.as_array()[[0, 2]], 1.0, 2.0, 0.0)
    assert sol.choices == (Choice.dense(), Choice.unstructured(GRID, 2)) and sol.formats is None
    assert "format" not in sol.to_json()["layers"]["b"]
    with pytest.raises(InvalidInputError, match="one choice per layer"):
        Solution(("a", "b"), np.array([0, 2]), np.zeros(2), 1.0, 2.0, 0.0, choices=(Choice.dense(),))

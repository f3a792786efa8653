"""The vocabulary of per-layer choices: N:M patterns, choices, the grid as columns."""

from __future__ import annotations

import json

import pytest

from spdy.choices import Choice, NMPattern, grid_choices, grid_position, parse_pattern, parse_patterns
from spdy.errors import InvalidInputError
from spdy.grid import DEFAULT_GRID, spdy_grid


def test_patterns_parse_and_validate() -> None:
    assert parse_pattern("2:4") == NMPattern(2, 4)
    assert parse_pattern(" 4:8 ").sparsity == 0.5
    assert parse_patterns("2:4,4:8,2:4") == ("2:4", "4:8")
    assert parse_patterns(["4:8", NMPattern(2, 4)]) == ("4:8", "2:4")
    assert parse_patterns(None) == () and parse_patterns("") == ()
    for bad in ("2/4", "4:2", "0:4", "2:4:8", "a:b"):
        with pytest.raises(InvalidInputError):
            parse_pattern(bad)
    assert NMPattern(2, 4).fits(768) and not NMPattern(4, 8).fits(36)
    assert NMPattern(4, 8).why_not(36) == "input size 36 is not a multiple of 8"


def test_choice_validation_and_json() -> None:
    grid = spdy_grid(4)
    dense, u2, nm = Choice.dense(), Choice.unstructured(grid, 2), Choice.nm("2:4")
    assert dense == Choice("dense", 0.0, 0) and Choice.unstructured(grid, 0) == dense
    assert u2 == Choice("unstructured", grid[2], 2) and u2.label.startswith("unstructured ")
    assert nm == Choice("2:4", 0.5, 0) and nm.is_nm and nm.nm_pattern == NMPattern(2, 4) and nm.label == "2:4"
    for c in (dense, u2, nm, Choice.nm("4:8")):
        assert Choice.from_json(json.loads(json.dumps(c.to_json()))) == c
    for args in (("dense", 0.5, 0), ("unstructured", 0.0, 0), ("2:4", 0.6, 0), ("2:4", 0.5, 3), ("2 : 4", 0.5, 0),
                 ("x", 0.5, 0)):
        with pytest.raises(InvalidInputError):
            Choice(*args)
    with pytest.raises(InvalidInputError, match="not on the grid"):
        Choice.unstructured(grid, 9)
    with pytest.raises(InvalidInputError):
        Choice.from_json({"pattern": "2:4"})


def test_grid_position_of_a_sparsity() -> None:
    grid = spdy_grid(8)
    for i, s in enumerate(grid.levels):
        assert grid_position(grid, s) == pytest.approx(i)
    # 2:4 and 4:8 (50 %) on SPDY's 42-level grid sit between levels 2 (45.8 %) and 3 (51.1 %)
    assert 2.7 < grid_position(DEFAULT_GRID, 0.5) < 2.85
    assert grid_position(grid, 0.999) == len(grid) - 1


def test_grid_choices_are_dense_then_each_level() -> None:
    grid = spdy_grid(3)
    cols = grid_choices(grid)
    assert cols[0] == Choice.dense() and len(cols) == len(grid)
    assert all(c == Choice("unstructured", grid[i], i) for i, c in enumerate(cols) if i)

"""How a layer can be pruned: dense, an unstructured grid level, or an N:M pattern.

On a GPU the useful ways to run a pruned layer are not only "unstructured at
level i": a 2:4 semi-structured weight runs on sparse tensor cores, while
unstructured 50-90 % runs no faster than dense. So each column of the DP's table
(:class:`~spdy.types.LatencyTable`) is a :class:`Choice`:

* ``Choice("dense", 0.0, 0)`` — the unpruned layer (grid level 0);
* ``Choice("unstructured", s_i, i)`` — grid level ``i >= 1`` (SPDY's levels);
* ``Choice("2:4", 0.5, 0)``, ``Choice("4:8", 0.5, 0)`` — an N:M pattern (``N`` kept of
  every ``M`` consecutive input weights per row); ``level`` is 0, the pattern's only
  level in the database (at sparsity ``1 - N/M``).

A table over a sparsity grid alone has the columns :func:`grid_choices`; one with N:M
patterns (:func:`spdy.profile.choice_table`) adds a column per pattern, ``+inf`` where a
layer does not have it. SPDY's prior places every column at its position on the grid
(:func:`grid_position`; 2:4 and 4:8 at 50 % sit at 2.79 on SPDY's 42-level grid), see
:func:`spdy.dp.prior_errors`.

Use::

    profile = profile_model(bundle, backend, grid, patterns=("2:4",))   # per-pattern times
    db = build_database(bundle, "db/", grid, patterns=("2:4",))          # N:M weights
    table = choice_table(profile, database=db)
    sol = dp.solve(table, dp.prior_errors(L, len(grid), c, table.positions()), speedup)
    db.stitch(model, sol)                                  # N:M weights included
    backend.time_models(bundle, [spdy.profilers.backend_plan(sol, db, bundle.model)])
    sol.to_json()["layers"]       # {layer: {"pattern", "sparsity", "level", "format"}}

or ``spdy.search(..., patterns="2:4")``, which does all of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from spdy.errors import InvalidInputError
from spdy.grid import SparsityGrid

DENSE = "dense"
UNSTRUCTURED = "unstructured"


# --------------------------------------------------------------------------- N:M patterns


@dataclass(frozen=True)
class NMPattern:
    """``n`` kept weights in every group of ``m`` consecutive input weights of a row."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m <= 64):
            raise InvalidInputError(
                f"an N:M pattern keeps n of every m weights with 0 < n < m <= 64; got n={self.n!r}, m={self.m!r}"
            )

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return self.name

    def fits(self, in_features: int) -> bool:
        """Whether a layer with this many (flattened) inputs can hold the pattern."""
        return in_features > 0 and in_features % self.m == 0

    def why_not(self, in_features: int) -> str | None:
        """None if :meth:`fits`, else the reason in words."""
        if self.fits(in_features):
            return None
        return f"input size {in_features} is not a multiple of {self.m}"


def parse_pattern(text: str | NMPattern) -> NMPattern:
    """``"2:4"`` -> ``NMPattern(2, 4)``."""
    if isinstance(text, NMPattern):
        return text
    parts = str(text).strip().split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        n, m = int(parts[0]), int(parts[1])
    except ValueError:
        raise InvalidInputError(
            f"an N:M pattern is written like '2:4' (keep 2 of every 4 consecutive input weights); got {text!r}"
        ) from None
    return NMPattern(n, m)


def parse_patterns(value: str | Iterable[str | NMPattern] | None) -> tuple[str, ...]:
    """``"2:4,4:8"`` or ``["2:4", "4:8"]`` -> ``("2:4", "4:8")`` (canonical names, duplicates dropped)."""
    if value is None:
        return ()
    items = [p for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
    out: list[str] = []
    for p in items:
        name = parse_pattern(p).name
        if name not in out:
            out.append(name)
    return tuple(out)


def is_nm(pattern: str) -> bool:
    return pattern not in (DENSE, UNSTRUCTURED)


# --------------------------------------------------------------------------- one choice


@dataclass(frozen=True)
class Choice:
    """How one layer is pruned: ``pattern`` (``"dense"``, ``"unstructured"`` or ``"N:M"``),
    its ``sparsity`` and its ``level`` (grid index for dense/unstructured, 0 for N:M)."""

    pattern: str
    sparsity: float
    level: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", float(self.sparsity))
        if isinstance(self.level, bool) or not isinstance(self.level, (int, np.integer)):
            raise InvalidInputError(f"a choice's level is an integer; got {self.level!r}")
        object.__setattr__(self, "level", int(self.level))
        if self.pattern == DENSE:
            if self.level != 0 or self.sparsity != 0.0:
                raise InvalidInputError(f"the dense choice has level 0 and sparsity 0; got {self.level}, {self.sparsity}")
        elif self.pattern == UNSTRUCTURED:
            if self.level < 1 or not 0.0 < self.sparsity < 1.0:
                raise InvalidInputError(
                    f"an unstructured choice has a grid level >= 1 and a sparsity in (0, 1); got level {self.level}, "
                    f"sparsity {self.sparsity} (level 0 is Choice('dense', 0.0, 0))"
                )
        else:
            nm = parse_pattern(self.pattern)
            if nm.name != self.pattern:
                raise InvalidInputError(f"write the pattern as {nm.name!r}, not {self.pattern!r}")
            if self.level != 0 or abs(self.sparsity - nm.sparsity) > 1e-12:
                raise InvalidInputError(
                    f"an {nm.name} choice has level 0 and sparsity {nm.sparsity:g}; got level {self.level}, "
                    f"sparsity {self.sparsity}"
                )

    @classmethod
    def dense(cls) -> "Choice":
        return cls(DENSE, 0.0, 0)

    @classmethod
    def unstructured(cls, grid: SparsityGrid, level: int) -> "Choice":
        """Grid level ``level`` (level 0 gives the dense choice)."""
        if not 0 <= int(level) < len(grid):
            raise InvalidInputError(f"level {level} is not on the grid (levels 0..{len(grid) - 1})")
        return cls.dense() if int(level) == 0 else cls(UNSTRUCTURED, grid[int(level)], int(level))

    @classmethod
    def nm(cls, pattern: str | NMPattern) -> "Choice":
        p = parse_pattern(pattern)
        return cls(p.name, p.sparsity, 0)

    @property
    def is_nm(self) -> bool:
        return is_nm(self.pattern)

    @property
    def is_dense(self) -> bool:
        return self.pattern == DENSE

    @property
    def nm_pattern(self) -> NMPattern | None:
        return parse_pattern(self.pattern) if self.is_nm else None

    @property
    def label(self) -> str:
        """``"dense"``, ``"2:4"`` or ``"unstructured 73.4%"``."""
        if self.pattern == UNSTRUCTURED:
            return f"unstructured {self.sparsity * 100:.1f}%"
        return self.pattern

    def to_json(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "sparsity": self.sparsity, "level": self.level}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Choice":
        try:
            return cls(str(d["pattern"]), float(d["sparsity"]), int(d["level"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidInputError):
                raise
            raise InvalidInputError(f"a choice is {{'pattern', 'sparsity', 'level'}}; got {d!r}") from None


# --------------------------------------------------------------------------- the grid as choices


def grid_position(grid: SparsityGrid, sparsity: float) -> float:
    """Fractional grid index of ``sparsity``: linear interpolation between the levels around it
    (clamped to ``[0, |S| - 1]``). A grid level's own sparsity gives its index exactly."""
    arr = grid.as_array()
    if len(arr) == 1:
        return 0.0
    return float(np.interp(float(sparsity), arr, np.arange(len(arr), dtype=np.float64)))


def grid_choices(grid: SparsityGrid) -> tuple[Choice, ...]:
    """The columns of a table over ``grid`` alone: dense, then each sparse level."""
    return tuple(Choice.unstructured(grid, i) for i in range(len(grid)))

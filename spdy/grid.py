"""Sparsity grids: the levels a layer can be pruned to.

SPDY's default grid is level 0 = dense, then ``n`` levels from ``lo`` to ``hi``
where each step keeps the same fraction of the remaining weights:
``s_i = 1 - (1 - lo) * ((1 - hi) / (1 - lo)) ** ((i - 1) / (n - 1))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spdy.errors import InvalidInputError


@dataclass(frozen=True)
class SparsityGrid:
    """An increasing tuple of sparsities; level 0 is always 0.0 (dense)."""

    levels: tuple[float, ...]

    def __post_init__(self) -> None:
        lv = tuple(float(s) for s in self.levels)
        if not lv:
            raise InvalidInputError("a sparsity grid needs at least one level; got none")
        if lv[0] != 0.0:
            raise InvalidInputError(
                f"level 0 of a sparsity grid must be 0.0 (dense); got {lv[0]!r}. "
                "Prepend 0.0 to the levels."
            )
        arr = np.asarray(lv)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr >= 1):
            raise InvalidInputError(f"sparsities must lie in [0, 1); got {list(lv)}")
        if np.any(np.diff(arr) <= 0):
            raise InvalidInputError(f"sparsities must be strictly increasing; got {list(lv)}")
        object.__setattr__(self, "levels", lv)

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, i: int) -> float:
        return self.levels[i]

    def as_array(self) -> np.ndarray:
        return np.asarray(self.levels, dtype=np.float64)

    def index_of(self, sparsity: float, tol: float = 1e-6) -> int:
        """Level index of ``sparsity``; raises if it is not on the grid."""
        arr = self.as_array()
        i = int(np.argmin(np.abs(arr - sparsity)))
        if abs(arr[i] - sparsity) > tol:
            raise InvalidInputError(
                f"sparsity {sparsity} is not on the grid (nearest level {i} = {arr[i]:.4f})"
            )
        return i

    def to_json(self) -> list[float]:
        return list(self.levels)

    @classmethod
    def from_json(cls, data: list[float]) -> "SparsityGrid":
        return cls(tuple(float(x) for x in data))


def spdy_grid(n: int = 41, lo: float = 0.40, hi: float = 0.99) -> SparsityGrid:
    """SPDY's default grid: dense plus ``n`` levels from ``lo`` to ``hi`` with a constant density ratio."""
    if n < 1:
        raise InvalidInputError(f"the grid needs n >= 1 sparse levels; got n={n}")
    if not (0 < lo < 1 and 0 < hi < 1):
        raise InvalidInputError(f"lo and hi must lie in (0, 1); got lo={lo}, hi={hi}")
    if n == 1:
        return SparsityGrid((0.0, lo))
    if hi <= lo:
        raise InvalidInputError(f"hi must exceed lo; got lo={lo}, hi={hi}")
    i = np.arange(n, dtype=np.float64)
    sparse = 1.0 - (1.0 - lo) * ((1.0 - hi) / (1.0 - lo)) ** (i / (n - 1))
    return SparsityGrid((0.0, *[float(s) for s in sparse]))


DEFAULT_GRID = spdy_grid()

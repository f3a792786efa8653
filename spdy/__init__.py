"""spdy: prune neural networks to a measured speedup target on real hardware."""

from __future__ import annotations

__version__ = "0.1.0"

from spdy.errors import (  # noqa: E402
    BackendUnavailableError,
    DatabaseError,
    InfeasibleBudgetError,
    InvalidInputError,
    ModelLoadError,
    NoPrunableLayersError,
    ProfileMismatchError,
    SpdyError,
)
from spdy.grid import DEFAULT_GRID, SparsityGrid, spdy_grid  # noqa: E402

__all__ = [
    "__version__",
    "SpdyError",
    "InvalidInputError",
    "InfeasibleBudgetError",
    "ModelLoadError",
    "NoPrunableLayersError",
    "ProfileMismatchError",
    "BackendUnavailableError",
    "DatabaseError",
    "SparsityGrid",
    "spdy_grid",
    "DEFAULT_GRID",
]

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
    ReferenceUnavailableError,
    SpdyError,
    StorageError,
)
from spdy.grid import DEFAULT_GRID, SparsityGrid, spdy_grid  # noqa: E402



def __getattr__(name: str) -> object:
    # the pipeline entry points import torch; load them on first use, not with the package
    if name in ("search", "apply"):
        from spdy import api

        return getattr(api, name)
    raise AttributeError(f"module 'spdy' has no attribute {name!r}")


__all__ = [
    "__version__",
    "search",
    "apply",
    "SpdyError",
    "InvalidInputError",
    "InfeasibleBudgetError",
    "ModelLoadError",
    "NoPrunableLayersError",
    "ProfileMismatchError",
    "BackendUnavailableError",
    "ReferenceUnavailableError",
    "DatabaseError",
    "StorageError",
    "SparsityGrid",
    "spdy_grid",
    "DEFAULT_GRID",
]

"""The one exception root of spdy and its narrow subclasses.

Every subclass also inherits the builtin that fits, so callers that catch
``ValueError`` or ``RuntimeError`` keep working. Messages say what was given,
what was expected, and what to do next.
"""

from __future__ import annotations


class SpdyError(Exception):
    """Root of every error raised on purpose by spdy."""


class InvalidInputError(SpdyError, ValueError):
    """An argument, file or array has the wrong shape, type or value."""


class InfeasibleBudgetError(SpdyError, ValueError):
    """The speedup target cannot be reached even with every layer at its fastest level."""

    def __init__(self, message: str, max_speedup: float | None = None) -> None:
        super().__init__(message)
        self.max_speedup = max_speedup


class ModelLoadError(SpdyError, RuntimeError):
    """A model, its factory or its calibration data could not be loaded."""


class NoPrunableLayersError(SpdyError, ValueError):
    """The model has no layer spdy can prune."""


class ProfileMismatchError(SpdyError, ValueError):
    """A profile or database was made for another model, grid or hardware."""


class BackendUnavailableError(SpdyError, RuntimeError):
    """A latency backend is unknown or cannot run on this machine."""


class DatabaseError(SpdyError, RuntimeError):
    """The reconstruction database is missing, incomplete or corrupted."""


class StorageError(SpdyError, RuntimeError):
    """The search's Optuna storage (a database server, an SQLite file) cannot be opened or lacks its driver."""


class ReferenceUnavailableError(BackendUnavailableError):
    """The dense runtime a speedup was asked against (``--reference onnxruntime``) cannot run the model here."""

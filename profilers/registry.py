"""The backends by name: :func:`get_backend`, :func:`backend_names`, :func:`available_backends`.

A backend class registers itself with :func:`spdy.profilers.base.register` when its module
is imported; the lookups here import the built-in backends' modules first.
"""

from __future__ import annotations

from typing import Any

from spdy.errors import BackendUnavailableError
from spdy.profilers.base import _REGISTRY, Backend, TimingPolicy

__all__ = ["available_backends", "backend_names", "get_backend"]


def _load_builtin() -> None:
    # importing the modules registers their backends
    from spdy.profilers import ort_cpu, spdy_cpu, torch_backends  # noqa: F401


def backend_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def available_backends() -> dict[str, str | None]:
    """Every known backend and None if it runs here, else why not."""
    _load_builtin()
    return {name: cls.unavailable_reason() for name, cls in sorted(_REGISTRY.items())}


def get_backend(name: str, threads: int | None = None, policy: TimingPolicy | None = None, **options: Any) -> Backend:
    """Make the backend ``name`` with ``threads`` threads (default: the usable cores).

    Raises :class:`~spdy.errors.BackendUnavailableError` for an unknown name or one
    that cannot run on this machine (the message says what to install).
    """
    _load_builtin()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise BackendUnavailableError(f"unknown latency backend {name!r}; expected one of {', '.join(sorted(_REGISTRY))}")
    reason = cls.unavailable_reason()
    if reason:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
    return cls(threads=threads, policy=policy, **options)

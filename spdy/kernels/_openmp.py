"""One OpenMP runtime for torch and Numba, so that only one thread pool spins.

torch's wheel bundles its own ``libgomp.so.1``; Numba's ``omp`` threading
layer links the system ``libgomp.so.1.0.0``. Loaded side by side they are two
thread pools whose idle workers spin for milliseconds after each parallel
region. A pruned model alternates torch ops and sparse kernels every few tens
of microseconds, so with 2 threads on 2 cores there are 4 busy threads and
calls stall for whole scheduler slices: a call that takes a fraction of a
millisecond with one runtime can take tens of milliseconds with two.

The fix: load the system libgomp (``RTLD_GLOBAL``) *before torch is
imported*. torch's ``NEEDED libgomp.so.1`` then matches the loaded library by
its soname, and Numba's ``libgomp.so.1.0.0`` is the same file, so both use one
runtime and one pool. This happens when :mod:`spdy.kernels` is imported,
only if torch is not imported yet, and only if the system library defines
every symbol version the bundled one does. Set ``SPDY_SHARED_OPENMP=0`` to
skip it. :func:`openmp_status` reports the outcome.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import re
import sys

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(rb"(?<![A-Za-z0-9_])(?:GOMP|OMP|GOACC)_[0-9]+(?:\.[0-9]+)*(?![A-Za-z0-9_.])")
_attempt: str = "not attempted"
_handle: ctypes.CDLL | None = None


def _version_names(path: str) -> set[bytes]:
    with open(path, "rb") as f:
        return set(_VERSION_RE.findall(f.read()))


def _torch_libgomp() -> str | None:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "lib", "libgomp.so.1")
    return path if os.path.exists(path) else None


def loaded_libgomp_files() -> list[str]:
    """Distinct libgomp files mapped into this process (by inode), from /proc/self/maps."""
    seen: dict[tuple[int, int], str] = {}
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and "libgomp" in os.path.basename(parts[-1]):
                    try:
                        st = os.stat(parts[-1])
                    except OSError:
                        continue
                    seen.setdefault((st.st_dev, st.st_ino), parts[-1])
    except OSError:
        return []
    return sorted(seen.values())


def share_openmp_runtime() -> str:
    """Preload the system libgomp so torch and Numba share it (see module docstring).

    Returns what happened, also kept for :func:`openmp_status`.
    """
    global _attempt, _handle
    if _handle is not None:
        return _attempt
    if not sys.platform.startswith("linux"):
        _attempt = "skipped: not Linux"
    elif os.environ.get("SPDY_SHARED_OPENMP", "1") == "0":
        _attempt = "skipped: SPDY_SHARED_OPENMP=0"
    elif "torch" in sys.modules:
        _attempt = "skipped: torch was imported before spdy.kernels"
    else:
        torch_lib = _torch_libgomp()
        if torch_lib is None:
            _attempt = "skipped: torch bundles no libgomp"
        else:
            try:
                handle = ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL)
            except OSError:
                _attempt = "skipped: no system libgomp.so.1"
            else:
                files = [p for p in loaded_libgomp_files() if os.path.realpath(p) != os.path.realpath(torch_lib)]
                if not files:
                    _attempt = "skipped: could not locate the system libgomp"
                elif not _version_names(torch_lib) <= _version_names(files[0]):
                    _attempt = f"skipped: {files[0]} lacks symbol versions torch's libgomp has"
                else:
                    _handle = handle
                    _attempt = f"preloaded {files[0]}"
    log.debug("shared OpenMP runtime: %s", _attempt)
    return _attempt


def openmp_status() -> dict[str, object]:
    """Whether torch and Numba run on one OpenMP runtime, and why (or why not)."""
    files = loaded_libgomp_files()
    # auditwheel-renamed copies (libgomp-<hash>.so, e.g. scikit-learn's) serve only their own
    # extension modules; torch and Numba resolve the soname libgomp.so.1
    relevant = [f for f in files if os.path.basename(f).startswith("libgomp.so")]
    return {"attempt": _attempt, "libgomp_files": files, "shared": len(relevant) <= 1}

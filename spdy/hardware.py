"""Hardware and runtime fingerprints: what a timing was measured on.

Every benchmark JSON and every profile carries one, and a profile measured on
other hardware is refused unless forced.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

# Keys that describe the moment, not the machine: never compared.
VOLATILE_KEYS = frozenset({"hostname", "timestamp", "load_average"})


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def fingerprint(threads: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """CPU model, cores, threads, OS, Python and runtime versions (plus backend extras)."""
    fp: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "system": platform.system(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("spdy", "numpy", "torch", "numba", "onnxruntime")},
    }
    if threads is not None:
        fp["threads"] = int(threads)
    if extra:
        fp.update(extra)
    return fp


def fingerprint_differences(expected: dict[str, Any], actual: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprints, ignoring volatile keys."""
    diffs: list[str] = []
    for key in sorted(set(expected) | set(actual)):
        if key in VOLATILE_KEYS:
            continue
        a, b = expected.get(key), actual.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: profile has {a!r}, this machine has {b!r}")
    return diffs

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

import spdy.profilers  # noqa: F401  - import the spdy kernels before torch (one OpenMP runtime)

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from spdy.grid import SparsityGrid  # noqa: E402
from spdy.profilers import QUICK_POLICY, available_backends, get_backend  # noqa: E402

GRID3 = SparsityGrid((0.0, 0.5, 0.9))
# short, but with the contention filter off: tests must not wait for a quiet machine
TEST_POLICY = dataclasses.replace(QUICK_POLICY, max_others=float("inf"))

BACKENDS = sorted(available_backends())


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    """Every registered backend; unavailable ones are skipped with the reason."""
    reason = available_backends()[request.param]
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    # no process-wide ORT pool in a test process: other tests create ORT sessions of their own
    options = {"shared_pool": False} if request.param == "ort-cpu" else {}
    return get_backend(request.param, threads=1, policy=TEST_POLICY, **options)


@pytest.fixture(scope="session")
def tiny_mlp():
    import profiler_tiny_models

    return profiler_tiny_models.mlp()


@pytest.fixture(scope="session")
def tiny_conv():
    import profiler_tiny_models

    return profiler_tiny_models.conv()

from __future__ import annotations

from pathlib import Path

# before anything imports torch: torch and the spdy kernels then share one OpenMP runtime
# for the whole session, as in the CLI (two runtimes' idle workers contend on 2 cores and
# make end-to-end timings in the slow tests 10-15% off the profile)
import spdy.kernels  # noqa: F401
import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "spdy-timings"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"SPDY reference timings not found at {REFERENCE} (../shared beside the checkout)")
    return REFERENCE

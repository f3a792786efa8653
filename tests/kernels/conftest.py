from __future__ import annotations

from collections.abc import Iterator

import numba
import pytest

import spdy.kernels as K  # imported before torch where possible: one OpenMP runtime


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test at 1 and 2 threads (torch and Numba together), then restore."""
    before = K.get_num_threads()
    n = min(request.param, numba.config.NUMBA_NUM_THREADS)
    K.set_num_threads(n)
    try:
        yield n
    finally:
        K.set_num_threads(before)

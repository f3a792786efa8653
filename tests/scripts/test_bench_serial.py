"""scripts/bench_serial.py: the three format variants of one uniform model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from spdy.grid import SparsityGrid
from spdy.profile import Profile
from spdy.types import LatencyTable

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_serial import variants  # noqa: E402


def test_variants_keep_levels_and_swap_only_the_sparse_formats_threading():
    grid = SparsityGrid((0.0, 0.5, 0.9))
    times = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]) * 1e-4
    formats = (("dense", "csr", "bcsr1x4-1t"), ("dense", "dense", "csr"))
    prof = Profile(table=LatencyTable(("a", "b"), grid, times, 1e-4, {}), formats=formats)
    v = variants(prof, 2.2)  # dense 0.7 ms, every layer at 0.9: 0.3 ms (2.33x); at 0.5: 0.5 ms (1.4x)
    assert list(v["profile"].levels) == list(v["serial"].levels) == list(v["parallel"].levels) == [2, 2]
    assert v["profile"].formats == ("bcsr1x4-1t", "csr")
    assert v["serial"].formats == ("bcsr1x4-1t", "csr-1t") and v["parallel"].formats == ("bcsr1x4", "csr")
    low = variants(prof, 1.2)  # level 1: layer b runs dense there, and stays dense in every variant
    assert low["serial"].formats == ("csr-1t", "dense") and low["parallel"].formats == ("csr", "dense")

"""scripts/bench_parity.py: a result's model in three kernel-format variants."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from spdy.grid import SparsityGrid
from spdy.profile import Profile
from spdy.types import LatencyTable

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_parity import variants  # noqa: E402


def test_variants_keep_the_result_levels_and_change_only_the_threading():
    grid = SparsityGrid((0.0, 0.5, 0.95))
    times = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]) * 1e-4
    formats = (("dense", "csr-1t", "bcsr1x4-1t"), ("dense", "csr", "csr"), ("dense", "csr", "csr"))
    table = Profile(table=LatencyTable(("a", "b", "c"), grid, times, 1e-4, {}), formats=formats).table
    layers = {"a": {"level": 1, "sparsity": 0.5}, "b": {"level": 2, "sparsity": 0.95}, "c": {"level": 0, "sparsity": 0.0}}
    v = variants(table, layers)
    assert all(list(s.levels) == [1, 2, 0] for s in v.values())
    assert v[""].formats == ("csr-1t", "csr", "dense")
    assert v["-parallel"].formats == ("csr", "csr", "dense")
    assert v["-serial>=.9"].formats == ("csr", "csr-1t", "dense")

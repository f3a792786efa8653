"""scripts/bench_pointwise.py: the implicit-GEMM path it times computes the same conv as conv2d."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from spdy.kernels import conv2d, prepare_conv2d

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_pointwise import implicit  # noqa: E402


def test_implicit_path_matches_torch_and_the_pixel_tiles():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((48, 24, 1, 1)) * (rng.random((48, 24, 1, 1)) > 0.8)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    x = rng.standard_normal((3, 24, 9, 11)).astype(np.float32)
    p = prepare_conv2d(w, b, format="csr")
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)).numpy()
    y = np.full_like(want, np.nan)
    implicit(x, p, y)
    np.testing.assert_allclose(y, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(conv2d(x, p), want, atol=1e-4, rtol=0)


def test_pays_from_is_the_lowest_level_under_the_fastest_dense():
    from bench_pointwise import pays_from

    us = {"dense": 100.0, "dense_cl": 80.0, "pixels@0.5": 90.0, "pixels@0.7": 70.0, "pixels@0.9": 30.0}
    assert pays_from(us, ["dense", "dense_cl"], [0.9, 0.5, 0.7]) == 0.7
    assert pays_from({**us, "dense_cl": 20.0}, ["dense", "dense_cl"], [0.5, 0.7, 0.9]) is None

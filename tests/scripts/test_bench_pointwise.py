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

"""scripts/bench_kernels.py: every method computes the same product, spdy's on tiles included."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))


def test_every_linear_method_runs_and_the_tiles_method_comes_with_a_sparse_format():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from bench_kernels import linear_methods  # noqa: E402

    rng = np.random.default_rng(0)
    W = (rng.standard_normal((48, 32)) * (rng.random((48, 32)) > 0.9)).astype(np.float32)
    x = rng.standard_normal((70, 32)).astype(np.float32)
    fns, fmt = linear_methods(W, x, 1, {"ort-sparse"})  # the tiles runner checks its product itself
    assert "spdy-tiles" in fns and fmt != "dense"
    for f in fns.values():
        f()
    dense, _ = linear_methods(rng.standard_normal((48, 32)).astype(np.float32), x, 1, {"ort-sparse"})
    assert "spdy" in dense  # an unpruned weight may get a dense format, with no tiles method then

"""scripts/bench_call_path.py: the module's per-call paths compute the same output and are all timed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from spdy.runtime import SparseLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_call_path import measure, paths  # noqa: E402


def test_every_path_computes_the_layer_and_the_measurement_reports_each():
    torch.manual_seed(1)
    lin = torch.nn.Linear(24, 40)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.9] = 0
    module = SparseLinear.from_linear(lin, "csr", tokens=7)
    x = torch.randn(1, 7, 24)
    want = torch.nn.functional.linear(x, lin.weight, lin.bias).detach()
    with torch.inference_mode():
        fns = paths(module, x)
        for name in ("module", "fast", "checked"):
            torch.testing.assert_close(fns[name](), want, atol=1e-5, rtol=1e-5)
        fns["kernel"]()
        fns["tiles"]()  # the layer on the tile layout
        np.testing.assert_allclose(fns["tiles"].output(), want[0].numpy(), atol=1e-5, rtol=1e-5)
    r = measure(40, 24, 0.9, tokens=7, rounds=2, calls=3)
    assert {"module_us", "fast_us", "checked_us", "kernel_us", "tiles_us", "fast_over_checked"} <= set(r)
    assert all(np.isfinite(r[k]) and r[k] > 0 for k in ("module_us", "fast_us", "checked_us", "kernel_us", "tiles_us"))

"""scripts/bench_depthwise.py: a small run times every depthwise chain and the whole model, and writes the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_depthwise import main  # noqa: E402


def factory(example_batch: int = 2) -> dict:
    """Two inverted-residual-like steps: pad + depthwise (stride 2) + BatchNorm + ReLU6, then depthwise + ReLU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(16, 16, 3, 2, groups=16),
                          nn.BatchNorm2d(16), nn.ReLU6(), nn.Conv2d(16, 16, 5, 1, 2, groups=16), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(8, 3, 12, 12)
    model(x)
    return {"model": model.eval(), "calibration": [x], "example": x[:example_batch]}


def test_small_run_reports_every_chain_and_the_model(tmp_path, capsys):
    out = tmp_path / "dw.json"
    assert main(["--model", "tests.scripts.test_bench_depthwise:factory", "--batch", "1", "3", "--threads", "1", "2",
                 "--rounds", "2", "--calls", "2", "--model-calls", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    layers = [r for r in data["records"] if r["kind"] == "layer"]
    models = [r for r in data["records"] if r["kind"] == "model"]
    assert {(r["batch"], r["threads"]) for r in models} == {(b, t) for b in (1, 3) for t in (1, 2)}
    assert len(layers) == 8 and all(r["torch_ms"] > 0 and r["spdy_ms"] > 0 for r in layers)
    assert {tuple(r["fused"]) for r in layers} == {("1", "4"), ("6",)}  # the BatchNorm between folded away
    assert all(r["max_abs_diff"] < 1e-4 for r in models)
    assert data["fingerprint"]["cpu_model"]
    assert "whole model" in capsys.readouterr().out

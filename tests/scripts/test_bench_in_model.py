"""scripts/bench_in_model.py: one module's time inside a forward pass and alone, from the same run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_in_model import in_model_vs_loop, sparsity_class  # noqa: E402


class Sleeps(nn.Module):
    """A layer that takes a known time: ``seconds`` per call."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x + 1


def test_in_model_and_alone_times_match_a_layer_of_known_time_and_leave_no_hooks():
    model = nn.Sequential(Sleeps(0.004), nn.ReLU(), Sleeps(0.001))
    x = torch.zeros(2, 3)

    def run() -> torch.Tensor:
        return model(x)

    run.model = model  # type: ignore[attr-defined]
    inside, alone, whole = in_model_vs_loop(run, ["0", "2"], rounds=2, calls=3, loop_calls=3)
    for got in (inside, alone):
        assert 0.004 <= got[0] < 0.012 and 0.001 <= got[1] < 0.006
    # the rest of the pass (a ReLU and the hooks) is small; medians over separate calls do not add
    # exactly, so a sleep that overshoots in one call may put the pass's median a little under
    # the sum of the layers' medians
    assert inside.sum() - 0.001 <= whole < inside.sum() + 0.005
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    assert [sparsity_class(s) for s in (0.0, 0.5, 0.9, 0.97)] == ["0", "<0.8", "<0.95", ">=0.95"]

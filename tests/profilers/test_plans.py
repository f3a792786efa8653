"""spdy.profilers.plans: the one builder of {layer: LayerChoice} plans."""

from __future__ import annotations

import numpy as np
import torch

from spdy.grid import SparsityGrid
from spdy.profile import Profile
from spdy.profilers import DENSE, LayerChoice, level_plan
from spdy.types import LatencyTable


def test_level_plan_runs_each_layer_at_its_level_in_the_profiles_format() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4, bias=False))
    grid = SparsityGrid((0.0, 0.5, 0.9))
    table = LatencyTable(("0", "1"), grid, np.ones((2, 3)), 1.0)
    prof = Profile(table, formats=((DENSE, "csr", "csr"), (DENSE, DENSE, "csr")))
    asked = []

    def weight(name: str, level: int) -> np.ndarray:
        asked.append((name, level))
        return np.full(model.get_submodule(name).weight.shape, float(level), np.float64)

    plan = level_plan(prof, model, [2, 1], weight)
    assert asked == [("0", 2), ("1", 1)]
    assert isinstance(plan["0"], LayerChoice) and plan["0"].fmt == "csr" and plan["0"].sparsity == 0.9
    assert plan["0"].weight.dtype == np.float32 and np.all(plan["0"].weight == 2.0)
    np.testing.assert_array_equal(plan["0"].bias, model[0].bias.detach().numpy())
    assert plan["1"].fmt == DENSE and plan["1"].sparsity == 0.5 and plan["1"].bias is None
    dense = level_plan(Profile(table), model, None, weight)
    assert [c.fmt for c in dense.values()] == [DENSE, DENSE] and all(c.sparsity == 0.0 for c in dense.values())

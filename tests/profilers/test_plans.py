"""spdy.profilers.plans: the one builder of {layer: LayerChoice} plans."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spdy.choices import Choice
from spdy.errors import InvalidInputError
from spdy.grid import SparsityGrid
from spdy.profile import Profile
from spdy.profilers import DENSE, LayerChoice, backend_plan
from spdy.types import LatencyTable, Solution


def test_a_profiles_solution_runs_each_layer_at_its_level_in_the_profiles_format() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4, bias=False))
    grid = SparsityGrid((0.0, 0.5, 0.9))
    table = LatencyTable(("0", "1"), grid, np.ones((2, 3)), 1.0)
    prof = Profile(table, formats=((DENSE, "csr", "csr"), (DENSE, DENSE, "csr")))
    asked = []

    def weight(name: str, choice: Choice) -> np.ndarray:
        asked.append((name, choice.level))
        return np.full(model.get_submodule(name).weight.shape, float(choice.level), np.float64)

    plan = backend_plan(prof.table.solution([2, 1]), weight, model)
    assert asked == [("0", 2), ("1", 1)]
    assert isinstance(plan["0"], LayerChoice) and plan["0"].fmt == "csr" and plan["0"].sparsity == 0.9
    assert plan["0"].weight.dtype == np.float32 and np.all(plan["0"].weight == 2.0)
    np.testing.assert_array_equal(plan["0"].bias, model[0].bias.detach().numpy())
    assert plan["1"].fmt == DENSE and plan["1"].sparsity == 0.5 and plan["1"].bias is None
    dense = backend_plan(Profile(table).table.solution([0, 0]), weight, model)  # no formats recorded: dense
    assert [c.fmt for c in dense.values()] == [DENSE, DENSE] and all(c.sparsity == 0.0 for c in dense.values())


def test_nm_choices_run_with_the_databases_weights_in_their_own_format() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4, bias=False))
    weights = {("0", "2:4"): np.full((8, 8), 2.0, np.float32), ("1", 0): np.ones((4, 8), np.float32)}
    db = SimpleNamespace(weight=lambda name, c: weights[(name, c.pattern if c.is_nm else c.level)])
    sol = Solution(layers=("0", "1"), levels=np.array([3, 0]), sparsities=np.array([0.5, 0.0]), predicted_time_s=1.0,
                   predicted_speedup=1.2, total_error=0.0, choices=(Choice.nm("2:4"), Choice.dense()),
                   formats=("2:4", "dense"))
    plan = backend_plan(sol, db, model)
    assert isinstance(plan["0"], LayerChoice) and plan["0"].fmt == "2:4" and plan["0"].sparsity == 0.5
    np.testing.assert_array_equal(plan["0"].weight, weights[("0", "2:4")])
    np.testing.assert_array_equal(plan["0"].bias, model[0].bias.detach().numpy())
    assert plan["1"].fmt == "dense" and plan["1"].bias is None
    with pytest.raises(InvalidInputError, match="no kernel format"):
        backend_plan({"0": Choice.nm("2:4")}, db, model, formats={"0": ""})

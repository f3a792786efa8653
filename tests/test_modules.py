"""spdy._modules: the one module swap (shared modules included) and batch moving."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spdy._modules import CsrLinear, move_batch, set_submodule, swap_modules
from spdy.errors import InvalidInputError


def test_a_module_shared_by_two_parents_is_swapped_under_both_names() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(nn.ReLU(), shared))
    new = nn.Identity()
    swap_modules(model, {"0.0": new})
    assert model[0][0] is new and model[1][1] is new
    assert not any(m is shared for m in model.modules())


def test_names_of_one_shared_module_keep_the_first_replacement() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, shared)
    first, second = nn.Identity(), nn.Tanh()
    swap_modules(model, {"0": first, "1": second})
    assert model[0] is first and model[1] is first


def test_unshared_modules_are_swapped_by_name() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    w = model[2].weight.detach().clone()
    b = model[2].bias.detach().clone()
    set_submodule(model, "2", CsrLinear(w, b))
    x = torch.randn(3, 4)
    assert isinstance(model[2], CsrLinear) and isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model[2](x), nn.functional.linear(x, w, b))


def test_an_unknown_name_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(InvalidInputError, match="no layer named 'fc'"):
        swap_modules(model, {"fc": nn.Identity()})
    with pytest.raises(InvalidInputError, match="model itself"):
        swap_modules(model, {"": nn.Identity()})


def test_move_batch_casts_floating_tensors_only() -> None:
    batch = {"ids": torch.ones(2, dtype=torch.long), "x": [torch.zeros(2)], "n": 3}
    out = move_batch(batch, "cpu", torch.float64)
    assert out["ids"].dtype == torch.long and out["x"][0].dtype == torch.float64 and out["n"] == 3

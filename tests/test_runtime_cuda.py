"""The GPU runtime: plans, masks and dtypes on the CPU; the 2:4 model itself only with CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from spdy.choices import Choice
from spdy.errors import BackendUnavailableError, InvalidInputError
from spdy.grid import spdy_grid
from spdy.profilers.pruning import magnitude_prune, prune_n_m
from spdy.runtime_cuda import (
    check_nm,
    nm_violations,
    plan_gpu_model,
    resolve_dtype,
    semi_structured_problem,
    to_gpu_model,
)
from spdy.types import Solution

CUDA = torch.cuda.is_available()
GRID = spdy_grid(4)


class Net(nn.Module):
    """BERT-like shapes, small: 2:4-ready Linears, one that is not (30 rows), a Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128)
        self.odd = nn.Linear(128, 30)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.odd(self.down(torch.relu(self.up(x))))


def test_resolve_dtype() -> None:
    assert resolve_dtype("float16") is torch.float16 and resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("BF16") is torch.bfloat16 and resolve_dtype(torch.bfloat16) is torch.bfloat16
    for bad in ("float32", torch.float32, "int8"):
        with pytest.raises(InvalidInputError, match="float16 .*bfloat16|half precision"):
            resolve_dtype(bad)


def test_semi_structured_problem_names_the_reason() -> None:
    for shape in ((768, 768), (3072, 768), (768, 3072), (384, 1536)):
        for dt in ("float16", "bfloat16"):
            assert semi_structured_problem("linear", shape, dt) is None
    assert "multiple of 32" in semi_structured_problem("linear", (30, 128), "float16")
    assert "multiple of 64" in semi_structured_problem("linear", (64, 96), "float16")
    assert "Linear layers only" in semi_structured_problem("conv2d", (64, 64, 1, 1), "float16")
    assert "half precision" in semi_structured_problem("linear", (768, 768), "float32")


def test_nm_mask_validity() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    assert nm_violations(w, 2, 4) == 64 * 32
    w24 = prune_n_m(w, 0.5, 2, 4)
    assert nm_violations(w24, 2, 4) == 0 and nm_violations(torch.from_numpy(w24), 2, 4) == 0
    check_nm(w24)
    w24_more = prune_n_m(w, 0.7, 2, 4)  # 2:4 and more zeros is still 2:4-valid
    check_nm(w24_more)
    w48 = prune_n_m(w, 0.5, 4, 8)
    assert nm_violations(w48, 4, 8) == 0
    assert nm_violations(w48, 2, 4) > 0  # a 4:8 weight is not 2:4 in general
    unstructured = magnitude_prune(w, 0.5)
    with pytest.raises(InvalidInputError, match="not 2:4 sparse.*Choice.nm"):
        check_nm(unstructured, name="layer x")
    with pytest.raises(InvalidInputError, match="multiple of m=4"):
        nm_violations(np.zeros((4, 6)), 2, 4)


def test_plan_decides_each_layers_module() -> None:
    model = Net()
    choices = {
        "up": Choice.nm("2:4"),
        "down": Choice.unstructured(GRID, 4),
        "odd": Choice.nm("4:8"),
        "conv": Choice.dense(),
    }
    plan = plan_gpu_model(model, choices, "bf16", formats={"down": "csr"})
    mods = {lp.name: lp.module for lp in plan.layers}
    assert mods == {"up": "2:4", "down": "csr", "odd": "dense", "conv": "dense"}
    assert plan.dtype == "bfloat16" and plan.counts() == {"2:4": 1, "csr": 1, "dense": 2}
    reasons = {lp.name: lp.reason for lp in plan.layers}
    assert "no 4:8 kernel" in reasons["odd"] and reasons["up"] == ""
    js = plan.to_json()
    assert js["layers"]["up"] == {"pattern": "2:4", "sparsity": 0.5, "level": 0, "module": "2:4"}
    # unstructured without a CSR format runs dense
    assert plan_gpu_model(model, {"down": Choice.unstructured(GRID, 4)}).layers[0].module == "dense"
    # a 2:4 layer whose profile found dense faster runs dense, as the profile's time assumes
    lp = plan_gpu_model(model, {"up": Choice.nm("2:4")}, formats={"up": "dense"}).layers[0]
    assert lp.module == "dense" and "dense kernel faster" in lp.reason


def test_plan_refuses_2_4_where_the_kernel_cannot_run_unless_not_strict(caplog) -> None:
    model = Net()
    with pytest.raises(InvalidInputError, match="'odd' cannot run 2:4 .*multiple of 32"):
        plan_gpu_model(model, {"odd": Choice.nm("2:4")})
    plan = plan_gpu_model(model, {"odd": Choice.nm("2:4")}, strict=False)
    assert plan.layers[0].module == "dense" and "runs dense" in plan.layers[0].reason
    assert "runs dense" in caplog.text
    with pytest.raises(InvalidInputError, match="Linear or Conv2d"):
        plan_gpu_model(model, {"": Choice.dense()})
    with pytest.raises(InvalidInputError, match="spdy.choices.Choice"):
        plan_gpu_model(model, {"up": 3})
    with pytest.raises(InvalidInputError, match="float16"):
        plan_gpu_model(model, {"up": Choice.nm("2:4")}, dtype="float32")


def test_plan_takes_a_solution_with_its_formats() -> None:
    sol = Solution(layers=("up", "down"), levels=np.array([5, 3]), sparsities=np.array([0.5, GRID[3]]),
                   predicted_time_s=1.0, predicted_speedup=1.5, total_error=0.1,
                   choices=(Choice.nm("2:4"), Choice.unstructured(GRID, 3)), formats=("2:4", "csr"))
    plan = plan_gpu_model(Net(), sol)
    assert [lp.module for lp in plan.layers] == ["2:4", "csr"]


@pytest.mark.skipif(CUDA, reason="checks the message shown without CUDA")
def test_to_gpu_model_without_cuda_says_what_is_missing() -> None:
    with pytest.raises(BackendUnavailableError, match="needs CUDA.*NVIDIA GPU"):
        to_gpu_model(Net(), {"up": Choice.nm("2:4")})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_to_gpu_model_runs_2_4_layers_and_matches_the_masked_dense_model(dtype: torch.dtype) -> None:
    from spdy.runtime_cuda import SemiStructuredLinear

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        for name in ("up", "down"):
            lin = getattr(model, name)
            lin.weight.copy_(torch.from_numpy(prune_n_m(lin.weight.numpy(), 0.5, 2, 4)))
    gpu = to_gpu_model(model, {"up": Choice.nm("2:4"), "down": Choice.nm("2:4")}, dtype=dtype)
    assert isinstance(gpu.up, SemiStructuredLinear) and isinstance(gpu.down, SemiStructuredLinear)
    assert gpu.spdy_gpu_plan.counts() == {"2:4": 2}
    x = torch.randn(32, 128, 128)
    ref = model.to("cuda", dtype)(x.to("cuda", dtype))  # dense with the same (masked) weights
    with torch.inference_mode():
        out = gpu(x.to("cuda", dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_to_gpu_model_refuses_a_weight_that_is_not_2_4() -> None:
    with pytest.raises(InvalidInputError, match="not 2:4 sparse"):
        to_gpu_model(Net(), {"up": Choice.nm("2:4")})

"""The dense runtimes a pruned model is compared with: torch eager, torch.compile and ONNX Runtime, timed apart by pool."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TEST_POLICY
from torch import nn

from spdy.models.base import ModelBundle
from spdy.profilers import as_numpy, get_backend
from spdy.profilers.dense_runtimes import (
    ONNXRUNTIME,
    PROBE_REPEATS,
    RUNTIMES,
    STATE_PROBE,
    TORCH,
    TORCH_CHANNELS_LAST,
    TORCH_COMPILE,
    DenseRuntime,
    DenseRuntimes,
    dense_runtimes,
    time_with_runtimes,
)
from spdy.profilers.ort_cpu import OrtCpuBackend
from spdy.profilers.torch_backends import TorchCpuBackend


class ErfinvMLP(nn.Module):
    """A user model with an op (erfinv) that ONNX's opset 17 exporter does not support."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.erfinv(0.5 * torch.tanh(self.fc1(x))))


def test_every_runtime_runs_the_dense_model_and_onnxruntime_gets_its_own_pool(tiny_mlp):
    be = get_backend("spdy-cpu", threads=1, policy=TEST_POLICY)
    rts = dense_runtimes(be, tiny_mlp)
    assert set(rts.runtimes) == {TORCH, TORCH_COMPILE, ONNXRUNTIME} and not rts.unavailable
    # torch's pool is the spdy kernels' (one OpenMP runtime), compiled or not
    assert rts.runtimes[TORCH].timer is None and rts.runtimes[TORCH_COMPILE].timer is None
    # the compiled runner is torch.compile's wrapper of a copy, not the eager model
    compiled = rts.runtimes[TORCH_COMPILE].runner
    assert any(isinstance(c.cell_contents, torch._dynamo.eval_frame.OptimizedModule)
               for c in compiled.__closure__ or ())
    ort = rts.runtimes[ONNXRUNTIME].timer
    assert isinstance(ort, OrtCpuBackend) and ort.threads == 1
    with torch.inference_mode():
        want = tiny_mlp.model(tiny_mlp.example).numpy()
    for r in rts.runtimes.values():
        np.testing.assert_allclose(as_numpy(r.runner()), want, rtol=1e-4, atol=1e-5)


def test_next_to_ort_cpu_torch_eager_is_the_one_timed_apart(tiny_mlp):
    be = get_backend("ort-cpu", threads=1, policy=TEST_POLICY, shared_pool=False)
    rts = dense_runtimes(be, tiny_mlp)
    assert rts.runtimes[ONNXRUNTIME].timer is None
    assert isinstance(rts.runtimes[TORCH].timer, TorchCpuBackend)
    assert rts.runtimes[TORCH_COMPILE].timer is rts.runtimes[TORCH].timer  # torch's pool, apart from ORT's


def test_a_model_onnxruntime_cannot_export_is_left_out_with_the_reason():
    torch.manual_seed(0)
    bundle = ModelBundle(name="erfinv-mlp", model=ErfinvMLP().eval(), calibration=[torch.randn(8, 16)])
    rts = dense_runtimes(get_backend("spdy-cpu", threads=1, policy=TEST_POLICY), bundle)
    assert set(rts.runtimes) == {TORCH, TORCH_COMPILE}
    assert "erfinv" in rts.unavailable[ONNXRUNTIME]


class _Recorder:
    """A backend that records what each measure() call timed together."""

    pool_rest_s = 0.0

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.policy = name, log, TEST_POLICY

    def time_models(self, bundle, plans, extra=(), blocks=False):
        self.log.append((self.name, [f"plan{i}" for i in range(len(plans))] + [r() for r in extra]))
        return [SimpleNamespace(median_s=1.0 + i) for i in range(len(plans) + len(extra))]

    def measure(self, runners, policy=None):
        self.log.append((self.name, [r() for r in runners]))
        return [SimpleNamespace(median_s=0.5) for _ in runners]


def test_a_runtime_of_another_pool_is_timed_in_its_own_block_alternating_sides():
    log: list = []
    backend, ort = _Recorder("backend", log), _Recorder("ort", log)
    rts = DenseRuntimes({TORCH: DenseRuntime(TORCH, lambda: TORCH), ONNXRUNTIME: DenseRuntime(ONNXRUNTIME, lambda: "ort", ort)})
    per_plan, per_runtime = time_with_runtimes(backend, None, [{}, {}], rts, rounds=3)
    assert log == [("backend", ["plan0", "plan1", TORCH]), ("ort", ["ort"]),
                   ("ort", ["ort"]), ("backend", ["plan0", "plan1", TORCH]),
                   ("backend", ["plan0", "plan1", TORCH]), ("ort", ["ort"])]
    assert [t.median_s for t in per_plan[0]] == [1.0, 2.0]
    assert {n: t.median_s for n, t in per_runtime[1].items()} == {TORCH: 3.0, ONNXRUNTIME: 0.5}
    # without runtimes: the plans alone, as Backend.time_models times them
    log.clear()
    per_plan, per_runtime = time_with_runtimes(backend, None, [{}], None, rounds=2)
    assert log == [("backend", ["plan0"])] * 2 and per_runtime == [{}, {}]


def test_measured_side_by_side_on_a_real_backend(tiny_mlp):
    be = get_backend("spdy-cpu", threads=1, policy=TEST_POLICY)
    rts = dense_runtimes(be, tiny_mlp)
    per_plan, per_runtime = time_with_runtimes(be, tiny_mlp, [{}], rts, rounds=2)
    assert len(per_plan) == 2 and all(len(p) == 1 for p in per_plan)
    assert all(set(r) == {TORCH, TORCH_COMPILE, ONNXRUNTIME} and all(t.median_s > 0 for t in r.values())
               for r in per_runtime)


def test_a_cnn_is_also_timed_in_channels_last_and_an_mlp_is_not(tiny_conv, tiny_mlp):
    from spdy.errors import ReferenceUnavailableError
    from spdy.reference import check_available

    be = get_backend("spdy-cpu", threads=1, policy=TEST_POLICY)
    rts = dense_runtimes(be, tiny_conv)
    assert TORCH_CHANNELS_LAST in rts.runtimes and rts.runtimes[TORCH_CHANNELS_LAST].timer is None
    with torch.inference_mode():
        want = tiny_conv.forward(tiny_conv.model, tiny_conv.example).numpy()
    np.testing.assert_allclose(as_numpy(rts.runtimes[TORCH_CHANNELS_LAST].runner()), want, rtol=1e-4, atol=1e-5)
    # the runner's model really is in channels_last (its first convolution's weight)
    cells = [c.cell_contents for c in rts.runtimes[TORCH_CHANNELS_LAST].runner.__closure__ or ()]
    (model,) = [c for c in cells if isinstance(c, nn.Module)]
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.shape[-1] > 1
    mlp = dense_runtimes(be, tiny_mlp)
    assert TORCH_CHANNELS_LAST not in mlp.runtimes and TORCH_CHANNELS_LAST not in mlp.unavailable  # not listed at all
    with pytest.raises(ReferenceUnavailableError, match="4-D image batch"):
        check_available(TORCH_CHANNELS_LAST, mlp)


def test_onnx_runtime_on_one_thread_is_timed_next_to_a_two_thread_backend_to_read_the_state(tiny_mlp):
    be = get_backend("spdy-cpu", threads=2, policy=TEST_POLICY)
    rts = dense_runtimes(be, tiny_mlp)
    probe = rts.runtimes[STATE_PROBE]
    assert isinstance(probe.timer, OrtCpuBackend) and probe.timer.threads == 1
    # a few calls a round: its time does not move with the state it reads
    reps = max(TEST_POLICY.min_samples, PROBE_REPEATS)
    assert probe.timer.policy.for_models().min_repeats == reps and probe.timer.policy.for_models().max_repeats == 2 * reps
    np.testing.assert_allclose(as_numpy(probe.runner()), as_numpy(rts.runtimes[ONNXRUNTIME].runner()), rtol=1e-5, atol=1e-6)
    per_plan, per_runtime = time_with_runtimes(be, tiny_mlp, [{}], rts, rounds=2)
    assert all(set(r) == {TORCH, TORCH_COMPILE, ONNXRUNTIME, STATE_PROBE} for r in per_runtime)
    # never a reference: not among the runtimes a user could deploy
    assert STATE_PROBE not in RUNTIMES
    assert STATE_PROBE not in dense_runtimes(be, tiny_mlp, state_probe=False).runtimes
    assert STATE_PROBE not in dense_runtimes(get_backend("spdy-cpu", threads=1, policy=TEST_POLICY), tiny_mlp).runtimes


def test_the_torch_runtimes_read_the_models_own_weights_and_leave_them_as_they_were(tiny_conv):
    """A float32 model's copy shares its weights' storage (they stay where its loader put them: a
    MiniLM's in its safetensors file's mapping, which torch.compile ran faster from than from a deep
    copy); the copy's parameters are its own objects, and channels_last leaves the model's alone."""
    from spdy.profilers.dense_runtimes import _dense_copy

    model = tiny_conv.model
    before = {n: (p.data_ptr(), p.stride(), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    copy_ = _dense_copy(tiny_conv)
    for (n, p), q in zip(model.named_parameters(), copy_.parameters()):
        assert q.data_ptr() == p.data_ptr() and q is not p and not q.requires_grad
    dense_runtimes(get_backend("spdy-cpu", threads=1, policy=TEST_POLICY), tiny_conv)  # channels_last among them
    for n, p in model.named_parameters():
        ptr, stride, grad, value = before[n]
        assert (p.data_ptr(), p.stride(), p.requires_grad) == (ptr, stride, grad) and torch.equal(p.detach(), value)
    # a model in another dtype is copied into float32, sharing nothing
    double = SimpleNamespace(model=nn.Linear(4, 3).double())
    copied = _dense_copy(double)
    assert copied.weight.dtype == torch.float32 and copied.weight.data_ptr() != double.model.weight.data_ptr()

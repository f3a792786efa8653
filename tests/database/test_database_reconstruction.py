"""Reconstruction: least-squares optimality, error accounting, exact sparsity, Conv2d, dead inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spdy.database.hessian import capture_hessians, layer_rows
from spdy.database.reconstruction import (
    METHODS,
    exact,
    magnitude,
    obs,
    reconstruct,
    relative_errors,
    upper_cholesky_of_inverse,
    zeros_per_level,
)
from spdy.errors import InvalidInputError
from spdy.grid import DEFAULT_GRID, spdy_grid
from spdy.models.base import get_module

from .toy_models import MLP, make_cnn, make_mlp, structured_inputs

GRID = DEFAULT_GRID.as_array()


def activations(bundle, name: str) -> torch.Tensor:
    """The explicit input rows X of a layer (tests only: the library never keeps them)."""
    module = get_module(bundle.model, name)
    rows = []
    h = module.register_forward_pre_hook(lambda m, inp: rows.append(layer_rows(m, inp[0].detach()).double()))
    with torch.no_grad():
        for b in bundle.calibration:
            bundle.forward(bundle.model, b)
    h.remove()
    return torch.cat(rows)


def matrix(bundle, name: str) -> torch.Tensor:
    w = get_module(bundle.model, name).weight.detach()
    return w.reshape(w.shape[0], -1)


@pytest.fixture(scope="module")
def mlp():
    b = make_mlp()
    return b, capture_hessians(b, b.layers())


@pytest.fixture(scope="module")
def cnn():
    b = make_cnn()
    return b, capture_hessians(b, b.layers())


def test_hessian_is_sum_of_outer_products(mlp, cnn) -> None:
    for bundle, stats in (mlp, cnn):
        for spec in bundle.layers():
            X = activations(bundle, spec.name)
            st = stats[spec.name]
            assert st.n_rows == X.shape[0]
            torch.testing.assert_close(st.H, X.T @ X, rtol=1e-10, atol=1e-8)


def test_dead_input_is_seen_as_dead(mlp) -> None:
    _bundle, stats = mlp
    assert stats["fc1"].H[MLP.DEAD, MLP.DEAD] == 0


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_exact_matches_numpy_lstsq(mlp, layer: str) -> None:
    bundle, stats = mlp
    X = activations(bundle, layer).numpy()
    W = matrix(bundle, layer)
    sp = spdy_grid(6).as_array()
    rec = reconstruct("exact", W, stats[layer].H, sp)
    W0 = W.double().numpy()
    live = np.abs(X).sum(0) > 0  # dead inputs: any value is optimal; lstsq picks 0
    for s in range(1, len(sp)):
        for r in range(W.shape[0]):
            keep = ~rec.pruned[s, r].numpy()
            K = keep & live
            ref = np.zeros(W.shape[1])
            if K.any():
                ref[K] = np.linalg.lstsq(X[:, K], X @ W0[r], rcond=None)[0]
            got = rec.weights[s, r].double().numpy()
            np.testing.assert_allclose(got[K], ref[K], rtol=2e-4, atol=2e-5 * np.abs(W0[r]).max())
            np.testing.assert_allclose(X @ got, X @ ref, rtol=1e-4, atol=1e-5 * np.abs(X @ W0[r]).max())


def test_exact_matches_lstsq_on_conv_patches(cnn) -> None:
    bundle, stats = cnn
    X = activations(bundle, "conv2").numpy()
    W = matrix(bundle, "conv2")
    rec = reconstruct("exact", W, stats["conv2"].H, np.array([0.0, 0.5, 0.9]))
    for s in (1, 2):
        for r in range(W.shape[0]):
            K = ~rec.pruned[s, r].numpy()
            ref = np.linalg.lstsq(X[:, K], X @ W[r].double().numpy(), rcond=None)[0]
            np.testing.assert_allclose(rec.weights[s, r].double().numpy()[K], ref, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_refit_error_never_above_magnitude(which: str, mlp, cnn) -> None:
    bundle, stats = {"mlp": mlp, "cnn": cnn}[which]
    for spec in bundle.layers():
        W = matrix(bundle, spec.name)
        H = stats[spec.name].H
        mag = reconstruct("magnitude", W, H, GRID).errors
        ob = reconstruct("obs", W, H, GRID).errors
        ex = reconstruct("exact", W, H, GRID).errors
        assert mag[0] == ob[0] == ex[0] == 0.0
        tol = 1e-7
        assert np.all(ob <= mag + tol), (spec.name, ob - mag)
        assert np.all(ex <= mag + tol), (spec.name, ex - mag)
        assert np.all(ex <= ob + tol), (spec.name, ex - ob)  # same masks, optimal refit


@pytest.mark.parametrize("method", METHODS)
def test_every_level_has_exactly_its_sparsity(method: str, mlp, cnn) -> None:
    for bundle, stats in (mlp, cnn):
        for spec in bundle.layers():
            W = matrix(bundle, spec.name)
            rec = reconstruct(method, W, stats[spec.name].H, GRID)
            want = zeros_per_level(GRID, W.numel())
            got_mask = rec.pruned.reshape(len(GRID), -1).sum(1).numpy()
            got_zero = (rec.weights == 0).reshape(len(GRID), -1).sum(1).numpy()
            np.testing.assert_array_equal(got_mask, want)
            np.testing.assert_array_equal(got_zero, want)
            torch.testing.assert_close(rec.weights[0], W.float())  # level 0 is the dense weight


def test_errors_are_relative_output_errors(mlp) -> None:
    """db errors == ||X W^T - X What^T||^2 / ||X W^T||^2 computed on the activations."""
    bundle, stats = mlp
    for spec in bundle.layers():
        X = activations(bundle, spec.name)
        W = matrix(bundle, spec.name).double()
        for method in METHODS:
            rec = reconstruct(method, W.float(), stats[spec.name].H, GRID)
            ref = [
                float(((X @ W.T - X @ rec.weights[s].double().T) ** 2).sum() / ((X @ W.T) ** 2).sum())
                for s in range(len(GRID))
            ]
            np.testing.assert_allclose(rec.errors, ref, rtol=1e-5, atol=1e-9)


def test_obs_sweep_errors_equal_explicit_errors() -> None:
    """The OBS errors come from the sweep's loss increments; they must equal tr(D H D^T)."""
    torch.manual_seed(3)
    X = structured_inputs(500, 200, seed=3).double()
    X[:, 7] = 0
    H = X.T @ X
    W = torch.randn(40, 200)
    for damp in (0.0 + 1e-4, 0.01, 0.1):
        weights, _pruned, errors = obs(W, H, GRID, damp=damp, blocksize=64)
        np.testing.assert_allclose(errors, relative_errors(W, weights, H), rtol=1e-4, atol=1e-8)


def test_conv2d_reconstruction_reduces_the_real_conv_output_error(cnn) -> None:
    bundle, stats = cnn
    conv = get_module(bundle.model, "conv2")
    inputs = []
    h = conv.register_forward_pre_hook(lambda m, inp: inputs.append(inp[0].detach()))
    with torch.no_grad():
        for b in bundle.calibration:
            bundle.forward(bundle.model, b)
    h.remove()
    x = torch.cat(inputs)
    W = conv.weight.detach()
    Wm = W.reshape(W.shape[0], -1)
    rec = reconstruct("obs", Wm, stats["conv2"].H, GRID)

    def conv_out(weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight.reshape(W.shape), None, conv.stride, conv.padding, conv.dilation).double()

    ref = conv_out(W)
    for s in (1, 10, 25, 41):
        err = float(((conv_out(rec.weights[s]) - ref) ** 2).sum() / (ref**2).sum())
        assert err == pytest.approx(rec.errors[s], rel=1e-4, abs=1e-9)
    mag = reconstruct("magnitude", Wm, stats["conv2"].H, GRID).errors
    assert rec.errors[20] < 0.8 * mag[20]  # the refit helps clearly on correlated patches


def test_dead_inputs_are_pruned_first_and_stay_finite(mlp) -> None:
    bundle, stats = mlp
    W = matrix(bundle, "fc1")
    for method in METHODS:
        rec = reconstruct(method, W, stats["fc1"].H, GRID)
        assert torch.isfinite(rec.weights).all() and np.all(np.isfinite(rec.errors))
        if method != "magnitude":
            # the dead column costs nothing: OBS prunes it at the first sparse level
            assert bool(rec.pruned[1, :, MLP.DEAD].all())


def test_upper_cholesky_of_inverse() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    H = A @ A.T + 0.1 * torch.eye(30, dtype=torch.float64)
    U, jitter = upper_cholesky_of_inverse(H)
    assert jitter == 0.0
    assert torch.allclose(U, torch.triu(U))
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H))


def test_singular_hessian_gets_jitter_not_a_crash() -> None:
    X = torch.randn(3, 10, dtype=torch.float64)  # rank 3 < 10 inputs
    H = X.T @ X
    W = torch.randn(4, 10)
    for method in METHODS:
        rec = reconstruct(method, W, H, np.array([0.0, 0.5]), damp=0.0)
        assert torch.isfinite(rec.weights).all() and np.all(np.isfinite(rec.errors))


def test_exact_with_nothing_kept_or_nothing_pruned() -> None:
    H = torch.eye(6, dtype=torch.float64)
    W = torch.randn(3, 6)
    pruned = torch.zeros((2, 3, 6), dtype=torch.bool)
    pruned[1] = True
    out = exact(W, H, pruned)
    torch.testing.assert_close(out[0], W)
    assert (out[1] == 0).all()


def test_magnitude_masks_are_nested() -> None:
    W = torch.randn(8, 9)
    _w, pruned = magnitude(W, GRID)
    assert bool((pruned[1:] >= pruned[:-1]).all())


def test_bad_inputs_are_refused() -> None:
    W = torch.randn(3, 4)
    H = torch.eye(4, dtype=torch.float64)
    with pytest.raises(InvalidInputError, match="unknown reconstruction method"):
        reconstruct("sparsegpt", W, H, GRID)
    with pytest.raises(InvalidInputError, match="H must be"):
        reconstruct("obs", W, torch.eye(5, dtype=torch.float64), GRID)
    with pytest.raises(InvalidInputError, match="damp"):
        reconstruct("obs", W, H, GRID, damp=-1.0)
    with pytest.raises(InvalidInputError, match="sparsities"):
        reconstruct("obs", W, H, np.array([0.0, 1.0]))


def _vm_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))


def test_obs_peak_memory_is_its_levels_about_twice() -> None:
    """obs holds its result (every level's weights and mask) and the sweep's buffers (about as
    much again) plus per-block and factor temporaries, and no more all-levels copies: the error
    pass goes level by level. It used to copy every level four more times (one in float64):
    here 7x the result over the start, and 5.2 GiB for one 4096 x 1024 layer (now 2.1 GiB)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # VmHWM := the current RSS
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak RSS")
    W = torch.randn(512, 1024)
    X = structured_inputs(2048, 1024, seed=5).double()
    X[:, 3] = 0  # a dead input: its share of the error pass goes level by level too
    H = X.T @ X
    del X
    obs(W[:8, :64], H[:64, :64], GRID)  # compile the sweep first: the JIT's memory is no level's
    start = _vm_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    weights, pruned, errors = obs(W, H, GRID)
    peak = (_vm_kib("VmHWM") - start) * 1024
    result = weights.numel() * 4 + pruned.numel()
    assert np.all(np.isfinite(errors))
    assert peak < 4.5 * result, f"peak {peak / 2**20:.0f} MiB over the start for {result / 2**20:.0f} MiB of levels"

from __future__ import annotations

import numpy as np
import pytest
import torch

from spdy.errors import InvalidInputError
from spdy.kernels.linear import prepare_linear
from spdy.kernels.residual import fusable, linear_residual


def _layer(fmt: str, K: int = 40, O: int = 48, sparsity: float = 0.8, seed: int = 0):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((O, K)) * (rng.random((O, K)) > sparsity)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    return W, b, prepare_linear(W, b, format=fmt)


def _inputs(tokens: int, K: int = 40, O: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(tokens)
    return rng.standard_normal((tokens, K)).astype(np.float32), rng.standard_normal((tokens, O)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["csr", "bcsr4x1", "bcsr1x4"])
@pytest.mark.parametrize("tokens", [1, 15, 17, 64, 100, 130])
def test_matches_dense_linear_plus_residual(threads: int, fmt: str, tokens: int) -> None:
    W, b, p = _layer(fmt)
    x, r = _inputs(tokens)
    ref = (torch.from_numpy(x).double() @ torch.from_numpy(W).double().T + torch.from_numpy(b).double()
           + torch.from_numpy(r).double()).numpy()
    np.testing.assert_allclose(linear_residual(x, r, p), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("tokens", [1, 17, 64, 130])
def test_layer_norm_epilogue_matches_torch(threads: int, tokens: int) -> None:
    W, b, p = _layer("csr")
    x, r = _inputs(tokens)
    rng = np.random.default_rng(7)
    g = rng.standard_normal(48).astype(np.float32)
    beta = rng.standard_normal(48).astype(np.float32)
    ref = torch.nn.functional.layer_norm(torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(W),
                                                                    torch.from_numpy(b)) + torch.from_numpy(r),
                                         (48,), torch.from_numpy(g), torch.from_numpy(beta), 1e-12).numpy()
    np.testing.assert_allclose(linear_residual(x, r, p, norm=(g, beta, 1e-12)), ref, atol=2e-5 * np.abs(ref).max())


def test_leading_dims_empty_weight_and_no_tokens() -> None:
    W, b, p = _layer("csr", sparsity=1.0)
    x = np.random.default_rng(3).standard_normal((2, 70, 40)).astype(np.float32)
    r = np.random.default_rng(4).standard_normal((2, 70, 48)).astype(np.float32)
    y = linear_residual(x, r, p)
    assert y.shape == (2, 70, 48)
    np.testing.assert_allclose(y, r + b, atol=1e-6)  # no weights: the bias plus the residual
    assert linear_residual(np.zeros((0, 40), np.float32), np.zeros((0, 48), np.float32), p).shape == (0, 48)


def test_fusable_and_refusals() -> None:
    W, b, p = _layer("csr")
    assert fusable(p)
    assert not fusable(prepare_linear(W, b, format="csr-1t")) and not fusable(prepare_linear(W, b, format="dense"))
    x, r = _inputs(4)
    with pytest.raises(InvalidInputError, match="multithreaded sparse"):
        linear_residual(x, r, prepare_linear(W, b, format="dense"))
    with pytest.raises(InvalidInputError, match=r"fp32 activations \[..., 40\]"):
        linear_residual(x[:, :39], r, p)
    with pytest.raises(InvalidInputError, match=r"residual must be fp32 of shape \(4, 48\)"):
        linear_residual(x, r[:, :47], p)
    with pytest.raises(InvalidInputError, match="norm needs 48 weights"):
        linear_residual(x, r, p, norm=(np.ones(5, np.float32), np.ones(48, np.float32), 1e-5))

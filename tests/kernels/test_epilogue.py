from __future__ import annotations

import numpy as np
import pytest
import torch

from spdy.errors import InvalidInputError
from spdy.kernels.epilogue import fusable, linear_norm
from spdy.kernels.linear import prepare_linear


def _case(fmt: str, tokens: int, K: int = 40, O: int = 48, sparsity: float = 0.8, seed: int = 0):
    rng = np.random.default_rng(seed + tokens)
    W = (rng.standard_normal((O, K)) * (rng.random((O, K)) > sparsity)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    x = rng.standard_normal((tokens, K)).astype(np.float32)
    r = rng.standard_normal((tokens, O)).astype(np.float32)
    g = rng.standard_normal(O).astype(np.float32)
    beta = rng.standard_normal(O).astype(np.float32)
    return W, b, x, r, g, beta, prepare_linear(W, b, format=fmt)


def _reference(x, W, b, r, g, beta, eps):
    """Dense torch in float64: linear, add, LayerNorm."""
    d = lambda a: torch.from_numpy(a).double()  # noqa: E731
    h = d(x) @ d(W).T + d(b) + d(r)
    return torch.nn.functional.layer_norm(h, (W.shape[0],), d(g), d(beta), eps).numpy()


@pytest.mark.parametrize("fmt", ["csr", "bcsr1x4", "bcsr4x1"])
@pytest.mark.parametrize("tokens", [1, 15, 17, 64, 100, 130])
def test_matches_dense_linear_add_layer_norm(threads: int, fmt: str, tokens: int) -> None:
    W, b, x, r, g, beta, p = _case(fmt, tokens)
    ref = _reference(x, W, b, r, g, beta, 1e-12)
    np.testing.assert_allclose(linear_norm(x, r, p, (g, beta, 1e-12)), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_leading_dims_empty_weight_and_no_tokens() -> None:
    W, b, _x, _r, g, beta, p = _case("csr", 1, sparsity=1.0)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 70, 40)).astype(np.float32)
    r = rng.standard_normal((2, 70, 48)).astype(np.float32)
    y = linear_norm(x, r, p, (g, beta, 1e-5))
    assert y.shape == (2, 70, 48)
    # no weights at all: the LayerNorm of bias plus residual
    ref = _reference(x.reshape(-1, 40), np.zeros_like(W), b, r.reshape(-1, 48), g, beta, 1e-5)
    np.testing.assert_allclose(y.reshape(-1, 48), ref, atol=1e-4)
    assert linear_norm(np.zeros((0, 40), np.float32), np.zeros((0, 48), np.float32), p, (g, beta, 1e-5)).shape == (0, 48)


def test_fusable_and_refusals() -> None:
    W, b, x, r, g, beta, p = _case("csr", 8)
    assert fusable(p)
    serial = prepare_linear(W, b, format="csr-1t")
    dense = prepare_linear(W, b, format="dense")
    assert not fusable(serial) and not fusable(dense)
    with pytest.raises(InvalidInputError, match="multithreaded sparse"):
        linear_norm(x, r, dense, (g, beta, 1e-5))
    with pytest.raises(InvalidInputError, match=r"fp32 activations \[..., 40\]"):
        linear_norm(x[:, :39], r, p, (g, beta, 1e-5))
    with pytest.raises(InvalidInputError, match="residual must be fp32 of shape"):
        linear_norm(x, r[:, :47], p, (g, beta, 1e-5))
    with pytest.raises(InvalidInputError, match="norm needs 48 weights"):
        linear_norm(x, r, p, (g[:5], beta, 1e-5))

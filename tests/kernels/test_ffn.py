from __future__ import annotations

import numpy as np
import pytest
import torch

from spdy.errors import InvalidInputError
from spdy.kernels.ffn import ffn, fusable, fused_threads
from spdy.kernels.linear import prepare_linear


def _pair(fmt_up: str, fmt_down: str, K: int = 48, M: int = 200, O: int = 48, seed: int = 0,
          sparsity: tuple[float, float] = (0.8, 0.7)):
    rng = np.random.default_rng(seed)
    W1 = (rng.standard_normal((M, K)) * (rng.random((M, K)) > sparsity[0])).astype(np.float32)
    W2 = (rng.standard_normal((O, M)) * (rng.random((O, M)) > sparsity[1])).astype(np.float32)
    b1 = rng.standard_normal(M).astype(np.float32)
    b2 = rng.standard_normal(O).astype(np.float32)
    return W1, b1, W2, b2, prepare_linear(W1, b1, format=fmt_up), prepare_linear(W2, b2, format=fmt_down)


def _reference(x: np.ndarray, W1: np.ndarray, b1: np.ndarray, W2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """Dense torch in float64: linear, exact GELU, linear."""
    xt = torch.from_numpy(x).double()
    h = torch.nn.functional.gelu(xt @ torch.from_numpy(W1).double().T + torch.from_numpy(b1).double())
    return (h @ torch.from_numpy(W2).double().T + torch.from_numpy(b2).double()).numpy()


@pytest.mark.parametrize("formats", [("csr", "csr"), ("bcsr4x1", "bcsr1x4"), ("bcsr1x4", "bcsr4x1")])
@pytest.mark.parametrize("tokens", [1, 15, 17, 64, 100, 130])
def test_matches_dense_linear_gelu_linear(threads: int, formats: tuple[str, str], tokens: int) -> None:
    W1, b1, W2, b2, up, down = _pair(*formats)
    x = np.random.default_rng(tokens).standard_normal((tokens, 48)).astype(np.float32)
    ref = _reference(x, W1, b1, W2, b2)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ffn(x, up, down), ref, atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(ffn(x, up, down, residual=True), ref + x, atol=2e-5 * scale, rtol=0)


@pytest.mark.parametrize("tokens", [1, 17, 64, 130])
def test_layer_norm_epilogue_matches_torch(threads: int, tokens: int) -> None:
    W1, b1, W2, b2, up, down = _pair("csr", "bcsr4x1")
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, 48)).astype(np.float32)
    g = rng.standard_normal(48).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    ref = torch.nn.functional.layer_norm(torch.from_numpy(_reference(x, W1, b1, W2, b2) + x).float(), (48,),
                                         torch.from_numpy(g), torch.from_numpy(b), 1e-12).numpy()
    np.testing.assert_allclose(ffn(x, up, down, residual=True, norm=(g, b, 1e-12)), ref, atol=2e-5 * np.abs(ref).max())
    with pytest.raises(InvalidInputError, match="norm needs 48 weights"):
        ffn(x, up, down, norm=(g[:5], b, 1e-5))


def test_leading_dims_empty_weights_and_no_tokens() -> None:
    W1, b1, W2, b2, up, down = _pair("csr", "csr", sparsity=(1.0, 1.0))
    x = np.random.default_rng(3).standard_normal((2, 70, 48)).astype(np.float32)
    y = ffn(x, up, down)
    assert y.shape == (2, 70, 48)
    # no weights at all: the bias of the down projection alone (GELU of the up bias times nothing)
    np.testing.assert_allclose(y, np.broadcast_to(b2, y.shape), atol=1e-6)
    assert ffn(np.zeros((0, 48), np.float32), up, down).shape == (0, 48)


def test_fusable_and_refusals() -> None:
    *_w, up, down = _pair("csr", "csr")
    assert fusable(up, down)
    assert not fusable(up, up)  # 200 outputs do not feed 48 inputs
    serial = prepare_linear(_w[0], _w[1], format="csr-1t")
    dense = prepare_linear(_w[0], _w[1], format="dense")
    assert not fusable(serial, down) and not fusable(dense, down)
    with pytest.raises(InvalidInputError, match="multithreaded sparse"):
        ffn(np.zeros((4, 48), np.float32), dense, down)
    with pytest.raises(InvalidInputError, match=r"fp32 activations \[..., 48\]"):
        ffn(np.zeros((4, 47), np.float32), up, down)
    *_v, up2, down2 = _pair("csr", "csr", O=40)
    with pytest.raises(InvalidInputError, match="residual"):
        ffn(np.zeros((4, 48), np.float32), up2, down2, residual=True)
    assert fused_threads(128, 2) == 2 and fused_threads(64, 2) == 1 and fused_threads(1, 4) == 1

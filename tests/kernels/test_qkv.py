from __future__ import annotations

import numpy as np
import pytest
import torch

from spdy.errors import InvalidInputError
from spdy.kernels.attention import attention, attention_qkv_unchecked, mask_bias
from spdy.kernels.linear import prepare_linear
from spdy.kernels.qkv import fusable, qkv


def _three(formats: tuple[str, str, str], K: int = 64, O: int = 64, seed: int = 0, sparsity: float = 0.8):
    rng = np.random.default_rng(seed)
    Ws = [(rng.standard_normal((O, K)) * (rng.random((O, K)) > sparsity)).astype(np.float32) for _ in formats]
    bs = [rng.standard_normal(O).astype(np.float32) for _ in formats]
    return Ws, bs, [prepare_linear(W, b, format=f) for W, b, f in zip(Ws, bs, formats)]


@pytest.mark.parametrize("formats", [("csr", "csr", "csr"), ("bcsr4x1", "csr", "bcsr1x4")])
@pytest.mark.parametrize("tokens", [1, 15, 64, 100, 130])
def test_matches_three_dense_linears_side_by_side(threads: int, formats: tuple[str, str, str], tokens: int) -> None:
    Ws, bs, ps = _three(formats)
    x = np.random.default_rng(tokens).standard_normal((tokens, 64)).astype(np.float32)
    xt = torch.from_numpy(x).double()
    ref = torch.cat([xt @ torch.from_numpy(W).double().T + torch.from_numpy(b).double() for W, b in zip(Ws, bs)],
                    dim=1).numpy()
    got = qkv(x, *ps)
    assert got.shape == (tokens, 192)
    np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
    # leading dimensions kept
    np.testing.assert_allclose(qkv(x.reshape(1, tokens, 64), *ps).reshape(tokens, 192), got, atol=0, rtol=0)


def test_attention_reads_the_fused_output_in_place(threads: int) -> None:
    B, T, H, D = 2, 40, 2, 32
    Ws, bs, ps = _three(("csr", "csr", "csr"), K=64, O=H * D, seed=3)
    x = np.random.default_rng(1).standard_normal((B * T, 64)).astype(np.float32)
    out = qkv(x, *ps)
    keep = torch.ones(B, 1, 1, T, dtype=torch.bool)
    keep[1, ..., 30:] = False
    q, k, v = (torch.from_numpy(np.ascontiguousarray(out[:, i * H * D:(i + 1) * H * D])).view(B, T, H, D).transpose(1, 2)
               for i in range(3))
    want = attention(q, k, v, keep, 0.17)
    got = attention_qkv_unchecked(out.reshape(-1), B, T, H, D, mask_bias(keep, B, T, T), 0.17)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_what_cannot_run_as_one_call_is_named() -> None:
    _Ws, _bs, ps = _three(("csr", "dense", "csr"))
    assert not fusable(*ps)
    with pytest.raises(InvalidInputError, match="csr 64x64, dense 64x64, csr 64x64"):
        qkv(np.zeros((4, 64), np.float32), *ps)
    _Ws, _bs, ps = _three(("csr", "csr", "csr"))
    assert fusable(*ps)
    with pytest.raises(InvalidInputError, match=r"float32 input \[\.\.\., 64\]"):
        qkv(np.zeros((4, 32), np.float32), *ps)
    assert qkv(np.zeros((0, 64), np.float32), *ps).shape == (0, 192)

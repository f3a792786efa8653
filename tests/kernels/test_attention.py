"""spdy's attention kernel against torch's scaled_dot_product_attention."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

import spdy.kernels as K  # noqa: F401 - before torch: one OpenMP runtime

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spdy.errors import InvalidInputError  # noqa: E402
from spdy.kernels._simd import hmax, hsum, vexp, vload, vstore  # noqa: E402
from spdy.kernels.attention import NEG, attention, mask_bias, unsupported  # noqa: E402


@njit
def _exp_all(x, y):
    for i in range(0, x.size, 16):
        vstore(y, i, vexp(vload(x, i)))


@njit
def _reduce(x):
    v = vload(x, 0)
    return hsum(v), hmax(v)


def test_vexp_against_numpy_float64() -> None:
    x = np.linspace(-87.0, 88.0, 16 * 997, dtype=np.float32)
    y = np.empty_like(x)
    _exp_all(x, y)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(y - ref) / ref) < 3e-7  # a few ulp
    low = np.full(16, -1e30, np.float32)
    _exp_all(low, low)
    assert np.all((low >= 0) & (low < 1e-37))  # masked scores: no inf, no NaN, ~0


def test_horizontal_sum_and_max() -> None:
    x = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    s, m = _reduce(x)
    assert s == pytest.approx(float(x.astype(np.float64).sum()), abs=1e-5)
    assert m == x.max()


def _qkv(B: int, H: int, Tq: int, Tk: int, D: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values as a transformer makes them: views of [B, T, H * D] projections."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H * D, generator=g).view(B, Tq, H, D).transpose(1, 2)
    k = torch.randn(B, Tk, H * D, generator=g).view(B, Tk, H, D).transpose(1, 2)
    v = torch.randn(B, Tk, H * D, generator=g).view(B, Tk, H, D).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("B,H,Tq,Tk,D", [(1, 12, 128, 128, 32), (2, 12, 77, 77, 32), (1, 4, 5, 5, 64),
                                         (3, 2, 33, 19, 96), (1, 1, 1, 1, 32), (2, 3, 130, 200, 32)])
def test_matches_sdpa(threads: int, B: int, H: int, Tq: int, Tk: int, D: int) -> None:
    q, k, v = _qkv(B, H, Tq, Tk, D)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    got = attention(q, k, v)
    assert got.shape == (B, Tq, H, D) and got.is_contiguous()
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)


def test_masks_and_scale_match_sdpa(threads: int) -> None:
    B, H, T, D = 3, 4, 50, 32
    q, k, v = _qkv(B, H, T, T, D, seed=1)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 30:] = False
    keep[2, :7] = False
    padding = keep[:, None, None, :]  # key padding, as Hugging Face's sdpa mask
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # [Tq, Tk], the same for every batch
    additive = torch.randn(B, 1, T, T) * 3
    for mask in (padding, causal, additive, torch.where(padding, 0.0, float("-inf"))):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
        torch.testing.assert_close(attention(q, k, v, mask, scale=0.3), ref, atol=2e-6, rtol=1e-5)


def test_copied_layouts_and_a_row_with_every_key_masked() -> None:
    B, H, T, D = 2, 3, 20, 32
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))  # heads apart: copied
    fused = torch.randn(B, T, 3 * H * D, generator=g)  # one QKV projection: strided slices
    q2, k2, v2 = (fused[..., i * H * D:(i + 1) * H * D].view(B, T, H, D).transpose(1, 2) for i in range(3))
    for a, b, c in ((q, k, v), (q2, k2, v2)):
        torch.testing.assert_close(attention(a, b, c), F.scaled_dot_product_attention(a, b, c).transpose(1, 2),
                                   atol=2e-6, rtol=1e-5)
    none = torch.zeros(B, 1, T, T, dtype=torch.bool)
    none[0] = True
    out = attention(q, k, v, none)
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()  # SDPA gives NaN there


def test_mask_bias_pads_keys_and_skips_a_mask_that_keeps_everything() -> None:
    assert mask_bias(torch.ones(2, 1, 1, 5, dtype=torch.bool), 2, 3, 5) is None
    bias = mask_bias(torch.tensor([[True, False, True]])[:, None, None, :], 1, 2, 3)
    assert bias.shape == (1, 2, 16)
    np.testing.assert_array_equal(bias[0, :, :3], np.float32([[0, NEG, 0], [0, NEG, 0]]))
    assert np.all(bias[..., 3:] == np.float32(NEG))


def test_what_the_kernel_cannot_run_is_named() -> None:
    q, k, v = _qkv(1, 2, 4, 4, 32)
    assert unsupported(q, k, v) is None
    assert "multiple of 32" in unsupported(*_qkv(1, 2, 4, 4, 16))
    assert "float32" in unsupported(q.double(), k, v)
    assert "dropout" in unsupported(q, k, v, dropout=0.1)
    assert "per head" in unsupported(q, k, v, torch.ones(1, 2, 4, 4, dtype=torch.bool))
    assert "broadcast" in unsupported(q, k, v, torch.ones(1, 1, 3, 4, dtype=torch.bool))
    # a mask for more sequences than the batch holds does not expand to it
    assert "broadcast" in unsupported(q, k, v, torch.ones(2, 1, 1, 4, dtype=torch.bool))
    q2, k2, v2 = _qkv(2, 2, 4, 4, 32)
    for shape in ((4,), (1, 4), (2, 1, 1, 4), (1, 1, 4, 4), (2, 1, 4, 4)):
        assert unsupported(q2, k2, v2, torch.ones(shape, dtype=torch.bool)) is None, shape
    with torch.enable_grad():
        assert "grad" in unsupported(q.requires_grad_(), k, v)
    with pytest.raises(InvalidInputError, match="head_dim 16.*scaled_dot_product_attention"):
        attention(*_qkv(1, 2, 4, 4, 16))

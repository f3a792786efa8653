"""The depthwise convolution kernel against torch's pad, grouped conv2d and clamp."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

import spdy.kernels as K  # noqa: F401 - before torch: one OpenMP runtime

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spdy.errors import InvalidInputError  # noqa: E402
from spdy.kernels import depthwise as D  # noqa: E402
from spdy.kernels._simd import vload, vmax, vmin, vstore  # noqa: E402
from spdy.kernels.depthwise import Padding, depthwise_conv2d  # noqa: E402


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int, pad: Padding,
               clamp: tuple[float, float] | None) -> torch.Tensor:
    y = F.conv2d(F.pad(x.double(), [pad.left, pad.right, pad.top, pad.bottom]), w.double(),
                 None if b is None else b.double(), stride, groups=x.shape[1])
    return y if clamp is None else y.clamp(*clamp)


# (batch, channels, height, width, kernel, stride, padding, clamp): channels a multiple of 16
# take the channel-vector path, others the plane path; asymmetric pads as TensorFlow's SAME makes
CASES = [
    (1, 32, 14, 14, 3, 1, Padding(1, 1, 1, 1), (0.0, 6.0)),
    (2, 48, 15, 17, 5, 2, Padding(1, 2, 2, 1), (0.0, 6.0)),
    (3, 16, 7, 7, 5, 1, Padding(2, 2, 2, 2), None),
    (2, 32, 9, 8, 3, 3, Padding(0, 2, 1, 0), (-1.0, 1.0)),
    (1, 16, 4, 4, 1, 1, Padding(), None),
    (1, 16, 113, 113, 3, 2, Padding(0, 0, 0, 0), (0.0, 6.0)),
    (2, 5, 9, 7, 5, 2, Padding(1, 2, 2, 1), (0.0, 6.0)),
    (3, 7, 8, 8, 3, 3, Padding(0, 2, 1, 0), None),
    (1, 4, 5, 5, 5, 1, Padding(2, 2, 2, 2), (0.0, 3.4e38)),
    (1, 3, 40, 37, 3, 1, Padding(1, 1, 1, 1), None),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}ch-{c[2]}x{c[3]}-k{c[4]}s{c[5]}" for c in CASES])
def test_matches_torch(threads: int, case: tuple) -> None:
    n, c, h, w, k, s, pad, clamp = case
    g = torch.Generator().manual_seed(h * 31 + c)
    x, wt, b = torch.randn(n, c, h, w, generator=g), torch.randn(c, 1, k, k, generator=g), torch.randn(c, generator=g)
    got = depthwise_conv2d(x, wt, b, (s, s), pad, clamp)
    ref = _reference(x, wt, b, s, pad, clamp)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)


def test_both_paths_agree_on_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plane too large for the channel-vector path goes plane by plane: same numbers."""
    g = torch.Generator().manual_seed(3)
    x, wt, b = torch.randn(2, 32, 20, 21, generator=g), torch.randn(32, 1, 3, 3, generator=g), torch.randn(32, generator=g)
    vec = depthwise_conv2d(x, wt, b, (2, 2), Padding(0, 1, 0, 1), (0.0, 6.0))
    monkeypatch.setattr(D, "CHANNEL_VECTOR_PIXELS", 16)
    planes = depthwise_conv2d(x, wt, b, (2, 2), Padding(0, 1, 0, 1), (0.0, 6.0))
    torch.testing.assert_close(vec, planes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(planes.double(), _reference(x, wt, b, 2, Padding(0, 1, 0, 1), (0.0, 6.0)),
                               atol=2e-5, rtol=1e-5)


def test_no_bias_and_strided_input() -> None:
    x = torch.randn(2, 20, 16, 32)[..., ::2]  # not contiguous: copied
    wt = torch.randn(16, 1, 3, 3)
    got = depthwise_conv2d(x[:, :16], wt, None, (1, 1), Padding(1, 1, 1, 1))
    torch.testing.assert_close(got.double(), _reference(x[:, :16], wt, None, 1, Padding(1, 1, 1, 1), None),
                               atol=2e-5, rtol=1e-5)


def test_padding_adds() -> None:
    assert Padding(1, 2, 3, 4) + Padding.symmetric(1, 2) == Padding(2, 3, 5, 6)


def test_refuses_what_it_cannot_run() -> None:
    x, wt = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3)
    with pytest.raises(InvalidInputError, match="float32 CPU"):
        depthwise_conv2d(x.double(), wt.double())
    with pytest.raises(InvalidInputError, match="one filter per channel"):
        depthwise_conv2d(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(InvalidInputError, match="strides 1-4"):
        depthwise_conv2d(x, wt, stride=(5, 5))
    with pytest.raises(InvalidInputError, match="requires grad"):
        depthwise_conv2d(x.requires_grad_(), wt)
    with pytest.raises(InvalidInputError, match=">= 0"):
        depthwise_conv2d(torch.randn(1, 4, 8, 8), wt, padding=Padding(-1, 0, 0, 0))
    with pytest.raises(InvalidInputError, match="does not fit"):
        depthwise_conv2d(torch.randn(1, 4, 2, 2), wt)
    assert D.unsupported(torch.randn(1, 4, 8, 8), wt, (1, 1), dilation=(2, 2)) is not None


@njit
def _clamp16(x, lo, hi, out):
    vstore(out, 0, vmin(vmax(vload(x, 0), vload(lo, 0)), vload(hi, 0)))


def test_vmin_vmax() -> None:
    x = np.linspace(-8, 8, 16).astype(np.float32)
    out = np.empty(16, np.float32)
    _clamp16(x, np.zeros(16, np.float32), np.full(16, 6, np.float32), out)
    np.testing.assert_array_equal(out, np.clip(x, 0, 6))

"""Exactness of the sparse Conv2d kernels against torch's conv2d in float64."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import spdy.kernels as K
from spdy.errors import InvalidInputError


def _ref(x, w, b, stride, padding, dilation, groups=1) -> np.ndarray:
    return torch.nn.functional.conv2d(
        torch.from_numpy(x).double(), torch.from_numpy(w).double(),
        None if b is None else torch.from_numpy(b).double(), stride, padding, dilation, groups,
    ).numpy()


@pytest.mark.parametrize("fmt", K.CONV_FORMATS)
@pytest.mark.parametrize(
    "n,c,o,h,w,k,stride,padding,dilation,sparsity",
    [
        (1, 1, 1, 1, 1, 1, 1, 0, 1, 0.0),  # smallest
        (1, 3, 8, 7, 7, 3, 1, 1, 1, 0.5),
        (2, 16, 32, 14, 14, 3, 1, 1, 1, 0.9),  # batch 2
        (1, 5, 4, 9, 6, 3, 2, 1, 1, 0.3),  # stride 2, odd sizes
        (1, 8, 8, 10, 10, 1, 1, 0, 1, 0.0),  # 1x1
        (1, 8, 8, 10, 10, 3, 1, 2, 2, 0.7),  # dilation
        (2, 4, 6, 11, 9, (3, 1), (2, 1), (1, 0), 1, 0.5),  # rectangular kernel and stride
        (1, 6, 3, 5, 5, 3, 1, 1, 1, 1.0),  # everything pruned
        (1, 4, 5, 13, 12, 5, 3, 2, 1, 0.6),  # stride 3
        (1, 9, 7, 40, 37, (2, 4), 2, (0, 3), (2, 1), 0.8),  # stride-2 vectorized path, asymmetric everything
        (1, 64, 64, 20, 20, 3, 1, 1, 1, 0.95),
        (3, 24, 40, 7, 7, 1, 1, 0, 1, 0.8),  # 1x1 over 147 pixels: tiles across images (Linear path)
        (2, 17, 33, 15, 11, 1, 1, 0, 1, 0.6),  # 1x1, odd sizes, last tile partial
        (4, 32, 16, 4, 4, 1, 1, 0, 2, 0.0),  # 1x1 with dilation (irrelevant), 64 pixels
    ],
)
def test_conv_matches_torch(fmt, n, c, o, h, w, k, stride, padding, dilation, sparsity, threads) -> None:
    rng = np.random.default_rng(n + c * 7 + o * 11 + h)
    kh, kw = (k, k) if isinstance(k, int) else k
    wt = rng.standard_normal((o, c, kh, kw)).astype(np.float32) * (rng.random((o, c, kh, kw)) >= sparsity)
    b = rng.standard_normal(o).astype(np.float32)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    for bias in (b, None):
        p = K.prepare_conv2d(wt, bias, stride=stride, padding=padding, dilation=dilation, format=fmt)
        y = K.conv2d(x, p)
        ref = _ref(x, wt, bias, stride, padding, dilation)
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)
    # unbatched input and a second spatial size (a new cached plan)
    y3 = K.conv2d(x[0], p)
    np.testing.assert_allclose(y3, _ref(x[:1], wt, None, stride, padding, dilation)[0], atol=1e-3)
    x2 = rng.standard_normal((1, c, h + 3, w + 1)).astype(np.float32)
    np.testing.assert_allclose(K.conv2d(x2, p), _ref(x2, wt, None, stride, padding, dilation), atol=1e-3)


def test_conv_zero_channels_and_same_padding() -> None:
    rng = np.random.default_rng(7)
    wt = rng.standard_normal((12, 10, 3, 3)).astype(np.float32) * (rng.random((12, 10, 3, 3)) > 0.5)
    wt[:, 2:6] = 0  # unused input channels
    wt[3:9] = 0  # empty output channels
    x = rng.standard_normal((1, 10, 15, 15)).astype(np.float32)
    p = K.prepare_conv2d(wt, None, padding="same", format="csr")
    np.testing.assert_allclose(K.conv2d(x, p), _ref(x, wt, None, 1, 1, 1), atol=1e-4)


def test_conv_validation_and_groups() -> None:
    w = np.ones((4, 2, 3, 3), np.float32)
    with pytest.raises(InvalidInputError, match="groups=1"):
        K.prepare_conv2d(w, groups=2, format="csr")
    p = K.prepare_conv2d(w, groups=2, format="auto")  # grouped: auto keeps it dense
    assert p.format == "dense"
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(K.conv2d(x, p), _ref(x, w, None, 1, 0, 1, groups=2), atol=1e-4)
    with pytest.raises(InvalidInputError, match="same"):
        K.prepare_conv2d(np.ones((1, 1, 2, 2), np.float32), padding="same")
    with pytest.raises(InvalidInputError, match="4 dimensions"):
        K.prepare_conv2d(np.ones((2, 2), np.float32))
    pc = K.prepare_conv2d(np.ones((1, 3, 3, 3), np.float32) * (np.arange(27).reshape(1, 3, 3, 3) % 2), format="csr")
    with pytest.raises(InvalidInputError, match=r"\[N, 3, H, W\]"):
        K.conv2d(np.ones((1, 4, 5, 5), np.float32), pc)
    with pytest.raises(InvalidInputError, match="smaller than the kernel"):
        K.conv2d(np.ones((1, 3, 2, 2), np.float32), pc)


def test_conv_auto_rule() -> None:
    rng = np.random.default_rng(8)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    assert K.choose_conv_format(w) == "dense"
    assert K.choose_conv_format(w * (rng.random(w.shape) > 0.5)) == "dense"  # torch's conv still wins at 50%
    w80 = w * (rng.random(w.shape) > 0.8)
    assert K.choose_conv_format(w80) == "csr"
    assert K.choose_conv_format(w80, pixels=1) == "dense"  # 16x rounding waste
    assert K.choose_conv_format(w80, groups=2) == "dense"
    assert K.prepare_conv2d(w80).format == "csr"


@pytest.mark.parametrize("nthreads", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n,hw", [(1, 20), (1, 64), (2, 49), (3, 100), (5, 64)])
def test_pixel_tiles_split_any_thread_count(nthreads: int, n: int, hw: int) -> None:
    """The 1x1 kernel's split of tiles and rows between ``nthreads`` work items, against torch:
    more items than tiles (rows split within a tile), fewer, and tiles across images."""
    from spdy.kernels.linear import tiles_into

    rng = np.random.default_rng(nthreads * 100 + n * 10 + hw)
    c, o = 40, 72
    wt = (rng.standard_normal((o, c)) * (rng.random((o, c)) >= 0.7)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    x = rng.standard_normal((n, c, hw)).astype(np.float32)
    for channel_major in (True, False):
        pl = K.prepare_linear(wt, b, format="csr")
        xin = x if channel_major else np.ascontiguousarray(x.transpose(0, 2, 1))
        y = np.full((n, o, hw) if channel_major else (n, hw, o), np.nan, np.float32)
        tiles_into(xin.reshape(-1), channel_major, n, hw, c, o, pl, y.reshape(-1), nthreads)
        ref = np.einsum("oc,nct->not", wt.astype(np.float64), x) + b[:, None]
        got = y if channel_major else y.transpose(0, 2, 1)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("nthreads", [1, 2, 3, 5])
@pytest.mark.parametrize("n,hw,stride", [(1, 5, 1), (1, 23, 2), (2, 12, 1), (4, 9, 2), (6, 17, 1)])
def test_implicit_split_any_thread_count(nthreads: int, n: int, hw: int, stride: int) -> None:
    """The 3x3 kernel's split between ``nthreads`` work items, against torch: images per
    thread, pixel tiles per thread, and one tile's rows across threads (1 image, 1 tile)."""
    from spdy.kernels.conv import implicit_into

    rng = np.random.default_rng(nthreads * 100 + n * 10 + hw)
    c, o = 6, 40
    wt = (rng.standard_normal((o, c, 3, 3)) * (rng.random((o, c, 3, 3)) >= 0.6)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    x = rng.standard_normal((n, c, hw, hw + 2)).astype(np.float32)
    p = K.prepare_conv2d(wt, b, stride=stride, padding=1, format="csr")
    Ho, Wo = p.output_size(*x.shape[2:])
    y = np.full((n, o, Ho, Wo), np.nan, np.float32)
    implicit_into(x, p, y, nthreads)
    np.testing.assert_allclose(y, _ref(x, wt, b, stride, 1, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", K.CONV_FORMATS)
@pytest.mark.parametrize(
    "n,c,o,h,k,stride,padding",
    [
        (2, 8, 16, 9, 3, 1, 1),  # implicit GEMM, images split between threads
        (1, 8, 16, 9, 3, 2, 1),  # stride 2, one image: tiles or rows split
        (3, 16, 8, 7, 1, 1, 0),  # 1x1: the Linear path over pixels
        (1, 12, 20, 12, 5, 1, 2),
    ],
)
def test_conv_epilogue_matches_torch(fmt, n, c, o, h, k, stride, padding, threads) -> None:
    """``clamp(conv(x) + residual)`` in every format, each part alone and both, against torch in float64."""
    rng = np.random.default_rng(c * 3 + o + k)
    wt = rng.standard_normal((o, c, k, k)).astype(np.float32) * (rng.random((o, c, k, k)) >= 0.7)
    b = rng.standard_normal(o).astype(np.float32)
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    p = K.prepare_conv2d(wt, b, stride=stride, padding=padding, format=fmt,
                         input_shape=x.shape if fmt == "dnnl" else None)
    ref = _ref(x, wt, b, stride, padding, 1)
    r = rng.standard_normal(ref.shape).astype(np.float32)
    for residual in (None, r):
        for clamp in (None, (0.0, np.inf), (0.0, 6.0), (-1.0, 0.5)):
            want = ref + (0.0 if residual is None else residual)
            if clamp is not None:
                want = np.clip(want, *clamp)
            got = K.conv2d(x, p, residual=residual, clamp=clamp)
            np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0,
                                       err_msg=f"residual={residual is not None}, clamp={clamp}")
    # the torch entry point of the dense formats gives the same
    if fmt in ("dense", "dnnl"):
        got = K.torch_conv2d(torch.from_numpy(x), p, torch.from_numpy(r), (0.0, np.inf)).numpy()
        np.testing.assert_allclose(got, np.maximum(ref + r, 0), atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)


def test_conv_epilogue_validation() -> None:
    w = np.ones((4, 2, 3, 3), np.float32)
    p = K.prepare_conv2d(w, padding=1, format="csr")
    x = np.ones((1, 2, 5, 5), np.float32)
    with pytest.raises(InvalidInputError, match=r"residual must be a numpy array of the output's shape \(1, 4, 5, 5\)"):
        K.conv2d(x, p, residual=np.ones((1, 4, 5, 4), np.float32))
    with pytest.raises(InvalidInputError, match="lo <= hi"):
        K.conv2d(x, p, clamp=(1.0, 0.0))
    with pytest.raises(InvalidInputError, match=r"\(lo, hi\) pair"):
        K.conv2d(x, p, clamp=0.0)
    if "dnnl" in K.CONV_FORMATS:
        with pytest.raises(InvalidInputError, match=r"input_shape must be \[N, 2, H, W\]"):
            K.prepare_conv2d(w, format="dnnl", input_shape=(1, 3, 5, 5))
        q = K.prepare_conv2d(w, padding=1, format="dnnl", input_shape=(1, 2, 5, 5))
        assert q.format == "dnnl" and q.dnnl_input == (1, 2, 5, 5)
        # another input size than the packing's runs too, and a copy packs again
        x2 = np.random.default_rng(1).standard_normal((3, 2, 8, 6)).astype(np.float32)
        np.testing.assert_allclose(K.conv2d(x2, copy.deepcopy(q)), _ref(x2, w, None, 1, 1, 1), atol=1e-4)


@pytest.mark.parametrize("fmt", K.CONV_FORMATS)
@pytest.mark.parametrize(
    "n,c,o,h,w,k,stride,padding",
    [
        (2, 16, 32, 9, 9, 3, 1, 1),  # 16x16 transposes in and out, images split between threads
        (1, 16, 32, 9, 11, 3, 2, 1),  # stride 2: both column phases from one channels-last row
        (1, 17, 20, 8, 5, 3, 1, 1),  # channels and pixels off the 16-wide blocks
        (2, 32, 48, 20, 20, 3, 2, 1),
        (1, 32, 16, 21, 19, 5, 1, 2),
        (2, 8, 8, 6, 6, 3, 3, 1),  # stride 3
        (3, 16, 16, 7, 7, 1, 1, 0),  # 1x1: a Linear layer on the pixels as they lie
    ],
)
def test_conv_channels_last_matches_torch(fmt, n, c, o, h, w, k, stride, padding, threads) -> None:
    """[N, H, W, C] in, [N, Ho, Wo, O] out, with and without the epilogue, against torch in float64."""
    rng = np.random.default_rng(n + c + o * 5 + k)
    wt = rng.standard_normal((o, c, k, k)).astype(np.float32) * (rng.random((o, c, k, k)) >= 0.7)
    b = rng.standard_normal(o).astype(np.float32)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    ref = _ref(x, wt, b, stride, padding, 1)
    r = rng.standard_normal(ref.shape).astype(np.float32)
    p = K.prepare_conv2d(wt, b, stride=stride, padding=padding, format=fmt)
    xl, rl = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, r))
    tol = 1e-4 * max(1.0, np.abs(ref).max())
    got = K.conv2d(xl, p, channels_last=True)
    assert got.shape == (n, *ref.shape[2:], o)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), ref, atol=tol, rtol=0)
    got = K.conv2d(xl, p, residual=rl, clamp=(0.0, 6.0), channels_last=True)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), np.clip(ref + r, 0.0, 6.0), atol=tol, rtol=0)
    with pytest.raises(InvalidInputError, match=rf"\[N, H, W, {c}\]"):
        K.conv2d(np.ascontiguousarray(xl[..., :1]), p, channels_last=True)

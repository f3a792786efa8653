"""The Numba vector intrinsics, tile bookkeeping and the shared-OpenMP setup."""

from __future__ import annotations

import numpy as np
from numba import njit

import spdy.kernels as K
from spdy.kernels import _spmm
from spdy.kernels._simd import copy_n, deinterleave2, ld, transpose16, vbroadcast, vfma, vload, vrsqrt, vstore, zero_n
from spdy.kernels._workspace import aligned_empty, scratch


@njit
def _axpy16(a, w, x, out):
    acc = vload(a, 0)
    acc = vfma(acc, vbroadcast(w), vload(x, 0))
    vstore(out, 0, acc)
    return ld(out, 15)


@njit
def _t16(src, dst, so, ss, do, ds):
    transpose16(src, so, ss, dst, do, ds)


@njit
def _copies(src, dst, d0, d1):
    zero_n(dst, 0, dst.size)
    copy_n(dst, 3, src, 5, 10)
    deinterleave2(src, 1, d0, 2, d1, 0)


@njit
def _rsqrt16(x, out):
    vstore(out, 0, vrsqrt(vload(x, 0)))


def test_vector_ops() -> None:
    rng = np.random.default_rng(0)
    a, x = rng.standard_normal((2, 16)).astype(np.float32)
    out = np.empty(16, np.float32)
    last = _axpy16(a, np.float32(1.5), x, out)
    np.testing.assert_allclose(out, a + 1.5 * x, rtol=1e-6)
    assert last == out[15]
    pos = np.abs(x) + np.float32(1e-3)
    _rsqrt16(pos, out)
    np.testing.assert_allclose(out, 1 / np.sqrt(pos.astype(np.float64)), rtol=1e-6)


def test_transpose16_with_strides() -> None:
    src = np.arange(40 * 50, dtype=np.float32)
    dst = np.zeros(40 * 60, np.float32)
    _t16(src, dst, 3 * 50 + 7, 50, 2 * 60 + 1, 60)
    s = src.reshape(40, 50)[3:19, 7:23]
    d = dst.reshape(40, 60)[2:18, 1:17]
    np.testing.assert_array_equal(d, s.T)


def test_copy_zero_deinterleave() -> None:
    src = np.arange(40, dtype=np.float32)
    dst = np.full(20, 9, np.float32)
    d0 = np.full(20, -1, np.float32)
    d1 = np.full(16, -1, np.float32)
    _copies(src, dst, d0, d1)
    np.testing.assert_array_equal(dst[:3], 0)
    np.testing.assert_array_equal(dst[3:13], src[5:15])
    np.testing.assert_array_equal(d0[2:18], src[1:33:2])
    np.testing.assert_array_equal(d1, src[2:34:2])


def test_tile_widths_cover_tokens() -> None:
    for t in range(0, 300):
        assert _spmm.padded_tokens(t) == _spmm.padded_tokens_py(t)
        assert t <= _spmm.padded_tokens_py(t) <= t + 48 or t == 0
        if t:
            assert _spmm.padded_tokens_py(t) % 16 == 0


def test_aligned_scratch() -> None:
    for n in (1, 100, 5000):
        assert aligned_empty(n).ctypes.data % 64 == 0
        buf = scratch(7, n)
        assert buf.size >= n and buf.ctypes.data % 64 == 0 and buf.dtype == np.float32


def test_threads_and_openmp_status() -> None:
    before = K.get_num_threads()
    try:
        K.set_num_threads(1)
        assert K.get_num_threads() == 1
    finally:
        K.set_num_threads(before)
    st = K.openmp_status()
    assert set(st) == {"attempt", "libgomp_files", "shared"}
    import pytest

    from spdy.errors import InvalidInputError

    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidInputError):
            K.set_num_threads(bad)  # type: ignore[arg-type]


def test_warmup_runs() -> None:
    assert K.warmup() >= 0.0

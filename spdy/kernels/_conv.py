"""Numba drivers for sparse Conv2d (groups=1) on the token-tile kernels of :mod:`spdy.kernels._spmm`.

Tokens are output pixels; the reduction index ``k`` runs over (input channel
``c``, tap row ``dy``, tap column ``dx``).

No im2col, any stride (``conv_implicit``). Stride 1: each image is copied
once into a zero-padded plane [C, Hp, Wp]; output pixels are numbered on the
padded width, ``t = oy * Wp + ox``, so the input row a nonzero (c, dy, dx)
needs for tokens t0..t0+Lt is the contiguous run
``Xpad[c*Hp*Wp + dy*dh*Wp + dx*dw + t0 :]``: the weight's index array holds
these element offsets directly. The ``Wp - Wo`` pad columns of each output
row are computed and dropped (2 of 58 columns for a 3x3 on 56x56). Stride s:
the padded input is split into s*s phase planes (every s-th row and column),
which turns the strided conv into s*s stride-1 convs on the phases.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from spdy.kernels._simd import copy_n, deinterleave2, ld, transpose16, zero_n
from spdy.kernels._spmm import (
    TILE,
    _JIT,
    _epilogue_inplace,
    _row_chunks,
    _tile_rows,
    _unpack_rows_channel_major,
    _unpack_rows_nhwc,
    _work_share,
    tile_width,
)


@njit(inline="always", **_JIT)
def _phase_row(x, src_row, W, pw, sw, b, Xq, dst, Wq):
    """Xq[dst + j] = x[src_row + j*sw + b - pw] where that column exists, else 0 (j < Wq)."""
    # valid j: 0 <= j*sw + b - pw < W
    j_lo = min(Wq, max(0, (pw - b + sw - 1) // sw))
    j_hi = max(j_lo, min(Wq, (W - 1 + pw - b) // sw + 1))
    zero_n(Xq, dst, j_lo)
    s0 = src_row + j_lo * sw + b - pw
    if sw == 1:
        copy_n(Xq, dst + j_lo, x, s0, j_hi - j_lo)
    else:
        for j in range(j_hi - j_lo):
            Xq[dst + j_lo + j] = ld(x, s0 + j * sw)
    zero_n(Xq, dst + j_hi, Wq - j_hi)


@njit(inline="always", **_JIT)
def _phase_rows2(x, src_row, W, pw, Xq, dst0, dst1, Wq):
    """Stride 2: both column phases of one padded row at once,
    Xq[dst_b + j] = x[src_row + 2j + b - pw] (0 outside the row), b = 0, 1."""
    # j where both 2j - pw and 2j + 1 - pw lie in [0, W): vectorized 16 at a time
    j_lo = min(Wq, max(0, (pw + 1) // 2))
    j_hi = max(j_lo, min(Wq, (W - 2 + pw) // 2 + 1))
    for j in range(0, j_lo):
        for b in range(2):
            col = 2 * j + b - pw
            v = ld(x, src_row + col) if col >= 0 and col < W else np.float32(0.0)
            Xq[(dst0 if b == 0 else dst1) + j] = v
    j = j_lo
    while j + 16 <= j_hi:
        deinterleave2(x, src_row + 2 * j - pw, Xq, dst0 + j, Xq, dst1 + j)
        j += 16
    while j < Wq:
        for b in range(2):
            col = 2 * j + b - pw
            v = ld(x, src_row + col) if col >= 0 and col < W else np.float32(0.0)
            Xq[(dst0 if b == 0 else dst1) + j] = v
        j += 1


@njit(**_JIT)
def _pack_image(x, xn, C, H, W, sh, sw, ph, pw, Hq, Wq, Xq, xs):
    """Image ``x[xn:]`` [C, H, W] zero-padded and split into its sh*sw stride phases at Xq[xs:]:
    ``Xq[xs + ((a*sw + b)*C + c)*Hq*Wq + i*Wq + j] = xpad[c, i*sh + a, j*sw + b]``."""
    plane = Hq * Wq
    if sh == 1 and sw == 1 and ph == 0 and pw == 0 and Hq == H and Wq == W:
        # no padding, no phases (1x1 convs): the planes are the input itself
        copy_n(Xq, xs, x, xn, C * H * W)
    elif sw == 2:
        for q in range(sh * C):
            a = q // C
            c = q - a * C
            for i in range(Hq):
                yy = i * sh + a - ph
                d0 = xs + ((a * sw) * C + c) * plane + i * Wq
                d1 = xs + ((a * sw + 1) * C + c) * plane + i * Wq
                if yy < 0 or yy >= H:
                    zero_n(Xq, d0, Wq)
                    zero_n(Xq, d1, Wq)
                else:
                    _phase_rows2(x, xn + (c * H + yy) * W, W, pw, Xq, d0, d1, Wq)
    else:
        for q in range(sh * sw * C):
            ab = q // C
            c = q - ab * C
            a = ab // sw
            b = ab - a * sw
            base = xs + q * plane
            for i in range(Hq):
                yy = i * sh + a - ph
                dst = base + i * Wq
                if yy < 0 or yy >= H:
                    zero_n(Xq, dst, Wq)
                else:
                    _phase_row(x, xn + (c * H + yy) * W, W, pw, sw, b, Xq, dst, Wq)


@njit(inline="always", **_JIT)
def _pack_image_nhwc(x, xn, C, H, W, sh, sw, ph, pw, Hq, Wq, Xq, xs):
    """Image ``x[xn:]`` [H, W, C] (channels last) into the zero-padded stride phases of
    :func:`_pack_image` at Xq[xs:]: 16 pixels x 16 channels at a time, transposed."""
    plane = Hq * Wq
    zero_n(Xq, xs, sh * sw * C * plane)
    for a in range(sh):
        for b in range(sw):
            base = xs + (a * sw + b) * C * plane
            # the columns j of phase b that hold an image column, xx = j*sw + b - pw in [0, W)
            j_lo = min(Wq, max(0, (pw - b + sw - 1) // sw))
            j_hi = max(j_lo, min(Wq, (W - 1 + pw - b) // sw + 1))
            for i in range(Hq):
                yy = i * sh + a - ph
                if yy < 0 or yy >= H:
                    continue
                src_row = xn + yy * W * C
                dst_row = base + i * Wq
                for j in range(j_lo, j_hi, 16):
                    nj = min(16, j_hi - j)
                    src = src_row + (j * sw + b - pw) * C
                    for c in range(0, C, 16):
                        nc = min(16, C - c)
                        if nj == 16 and nc == 16:
                            transpose16(x, src + c, sw * C, Xq, dst_row + c * plane + j, plane)
                        else:
                            for r in range(nj):
                                for cc in range(nc):
                                    Xq[dst_row + (c + cc) * plane + j + r] = x[src + r * sw * C + c + cc]


def phase_buffer_size(C: int, sh: int, sw: int, Hq: int, Wq: int) -> int:
    """Floats of one thread's phase-plane buffer (with the slack the last tile reads), a multiple of 16."""
    n = sh * sw * C * Hq * Wq + TILE + Wq
    return -(-n // 16) * 16


@njit(parallel=True, **_JIT)
def conv_implicit(x, N, C, H, W, sh, sw, ph, pw, Hq, Wq, Ho, Wo, O, ptr, n_panels, col, val, bias, row_cost, Xq, xq_size,
                  YP, y, nthreads, res, epi, elo, ehi, channels_last):
    """Sparse conv of N images, any stride, no im2col: x [N, C, H, W] -> y [N, O, Ho, Wo] (flattened;
    ``channels_last``: x [N, H, W, C] -> y [N, Ho, Wo, O]).

    The zero-padded input is split into sh*sw stride phases (:func:`_pack_image`);
    tap (dy, dx) of channel c then reads phase ((dy*dh) % sh, (dx*dw) % sw)
    shifted by ((dy*dh) // sh, (dx*dw) // sw), a contiguous run for a run of
    output pixels numbered ``t = oy*Wq + ox`` (pixels with ox >= Wo are
    computed and dropped). ``col`` holds each nonzero's element offset.

    Nothing one thread writes is read by another: with at least as many images
    as threads each thread packs and convolves whole images; with fewer, every
    thread packs each image into its own buffer and takes a run of its pixel
    tiles (or, with fewer tiles than threads, a chunk of one tile's output
    rows). ``Xq``: scratch of ``nthreads * xq_size`` floats
    (:func:`phase_buffer_size`); ``YP``: ``nthreads * O * TILE`` floats. ``res``, ``epi``,
    ``elo``, ``ehi``: the epilogue applied as the outputs are written
    (:func:`spdy.kernels._spmm._store_run`'s ``r``, ``epi``, ``lo``, ``hi``; ``res`` shaped as
    ``y``, ``epi`` 0 for none).
    """
    T = Ho * Wq
    plane = Hq * Wq
    n_tiles = (T + TILE - 1) // TILE
    by_image = N >= nthreads
    per_tile = 1 if by_image else max(1, nthreads // n_tiles)
    bounds = _row_chunks(row_cost, O, per_tile)
    slack = sh * sw * C * plane
    for c in prange(nthreads):
        xs = c * xq_size
        ys = c * O * TILE
        Xq[xs + slack : xs + xq_size] = np.float32(0.0)
        if by_image:
            n_lo = N * c // nthreads
            n_hi = N * (c + 1) // nthreads
            lo = 0
            hi = n_tiles
            r0 = 0
            r1 = O
        else:
            n_lo = 0
            n_hi = N
            lo, hi, r0, r1 = _work_share(c, nthreads, n_tiles, per_tile, bounds, O)
        if hi <= lo or r1 <= r0:
            n_hi = n_lo
        for n in range(n_lo, n_hi):
            if channels_last:
                _pack_image_nhwc(x, n * C * H * W, C, H, W, sh, sw, ph, pw, Hq, Wq, Xq, xs)
            else:
                _pack_image(x, n * C * H * W, C, H, W, sh, sw, ph, pw, Hq, Wq, Xq, xs)
            yn = n * O * Ho * Wo
            for tile in range(lo, hi):
                t0 = tile * TILE
                Lt = tile_width(T, t0)
                # the thread's [O, Lt] buffer holds rows r0:r1 from its start
                yb = ys - r0 * Lt
                _tile_rows(col, val, ptr, n_panels, O, r0, r1, 1, Xq, xs + t0, YP, yb, bias, Lt, 0)
                # a thread with whole images applies the epilogue to each image at once, below
                tile_epi = 0 if by_image else epi
                if channels_last:
                    _unpack_rows_nhwc(YP, yb, Lt, y[yn:], t0, T, r0, r1, Wq, Wo, O, res[yn:], tile_epi, elo, ehi)
                else:
                    _unpack_rows_channel_major(YP, yb, Lt, y[yn:], t0, T, r0, r1, Ho * Wo, Wq, Wo, res[yn:], tile_epi,
                                               elo, ehi)
            if by_image and epi != 0:
                _epilogue_inplace(y, yn, O * Ho * Wo, res, epi, elo, ehi)

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

from spdy.kernels._simd import copy_n, deinterleave2, ld, zero_n
from spdy.kernels._spmm import TILE, _JIT, _row_chunks, _spmm_rows


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


@njit(parallel=True, **_JIT)
def conv_implicit(x, N, C, H, W, sh, sw, ph, pw, Hq, Wq, Ho, Wo, O, ptr, n_panels, col, val, bias, row_cost, Xq, YP, y, nthreads):
    """Sparse conv of N images, any stride, no im2col: x [N, C, H, W] -> y [N, O, Ho, Wo] (flattened).

    The zero-padded input is split into sh*sw stride phases,
    ``Xq[((a*sw + b)*C + c)*Hq*Wq + i*Wq + j] = xpad[c, i*sh + a, j*sw + b]``;
    tap (dy, dx) of channel c then reads phase ((dy*dh) % sh, (dx*dw) % sw)
    shifted by ((dy*dh) // sh, (dx*dw) // sw), a contiguous run for a run of
    output pixels numbered ``t = oy*Wq + ox`` (pixels with ox >= Wo are
    computed and dropped). ``col`` holds each nonzero's element offset.
    ``Xq``: scratch of at least sh*sw*C*Hq*Wq + TILE + Wq floats; ``YP``:
    padded_tokens(Ho*Wq) * O floats.
    """
    T = Ho * Wq
    plane = Hq * Wq
    n_planes = sh * sw * C
    slack_start = n_planes * plane
    slack_end = min(Xq.size, slack_start + TILE + Wq)
    Xq[slack_start:slack_end] = np.float32(0.0)
    bounds = _row_chunks(row_cost, O, nthreads)
    for n in range(N):
        xn = n * C * H * W
        if sh == 1 and sw == 1 and ph == 0 and pw == 0 and Hq == H and Wq == W:
            # no padding, no phases (1x1 convs): the planes are the input itself
            copy_n(Xq, 0, x, xn, C * H * W)
        elif sw == 2:
            for q in prange(sh * C):
                a = q // C
                c = q - a * C
                for i in range(Hq):
                    yy = i * sh + a - ph
                    d0 = ((a * sw) * C + c) * plane + i * Wq
                    d1 = ((a * sw + 1) * C + c) * plane + i * Wq
                    if yy < 0 or yy >= H:
                        zero_n(Xq, d0, Wq)
                        zero_n(Xq, d1, Wq)
                    else:
                        _phase_rows2(x, xn + (c * H + yy) * W, W, pw, Xq, d0, d1, Wq)
        else:
            for q in prange(n_planes):
                ab = q // C
                c = q - ab * C
                a = ab // sw
                b = ab - a * sw
                base = q * plane
                for i in range(Hq):
                    yy = i * sh + a - ph
                    dst = base + i * Wq
                    if yy < 0 or yy >= H:
                        zero_n(Xq, dst, Wq)
                    else:
                        _phase_row(x, xn + (c * H + yy) * W, W, pw, sw, b, Xq, dst, Wq)
        yn = y[n * O * Ho * Wo : (n + 1) * O * Ho * Wo]
        for ci in prange(nthreads):
            r0 = bounds[ci]
            r1 = bounds[ci + 1]
            if r1 > r0:
                _spmm_rows(Xq, False, T, C, O, ptr, n_panels, col, val, 0, bias, YP, yn, 1, Ho * Wo, Wq, Wo, r0, r1)

"""Numba kernels: sparse weight times token-contiguous activations, Y^T = W X^T.

Notation (the paper's, plus the kernel's own): ``W`` is the [O, K] weight with
most entries zero, ``X`` the [T, K] activations (T tokens, or output pixels of
a convolution), ``Y = X W^T + b`` the [T, O] result.

Layout and blocking, from measurements on a 2-core Zen 5 (see
``scripts/results/kernels.md``):

* Tokens are the vector dimension. ``X`` is relaid into tiles of ``Lt`` tokens
  (64, or 16/32/64 for the last tile), each tile stored as [K, Lt] so that one
  nonzero ``W[o, j]`` multiplies the contiguous row ``X^T[j, t0:t0 + Lt]``.
* Register blocking: one output row ``o`` of a 64-token tile is held in four
  16-lane accumulators (:mod:`spdy.kernels._simd`) across all its nonzeros; each
  nonzero costs one broadcast, four vector loads and four FMAs.
* Column panels: the nonzeros are grouped by blocks of ``panel`` input columns
  so the activation rows one panel touches (panel x 64 x 4 bytes = 32 KiB)
  stay in L1 while all output rows sweep over them; partial sums go through
  the (L1/L2 resident) tile of ``Y^T``. Without panels the kernel is bound by
  L2->L1 bandwidth (~65-90 GFLOP/s instead of ~120-140).
* Threads split the token tiles (:func:`tiles_forward`): each packs, multiplies
  and writes its own tiles, so nothing one core wrote is read by another. Only
  when there are fewer tiles than threads do the threads of one tile split its
  output rows, into contiguous chunks of equal work (nonzeros plus a per-row
  constant) rounded to 16 rows so that the transposition back to [T, O] never
  shares a cache line between threads.

Weight format (``panel-CSR``): nonzeros sorted by (panel, row, column);
``ptr[p * O + o] : ptr[p * O + o + 1]`` are the nonzeros of row ``o`` in panel
``p``; ``col`` holds the column ``j`` (uint16 when K <= 65536) or, for the
implicit convolution, a precomputed element offset (int32); ``val`` the fp32
weights. ``bcsr1x4`` stores aligned groups of 4 consecutive columns of one
row as one entry (one index, four weights); ``bcsr4x1`` aligned groups of 4
consecutive rows that share a column (one index, four weights, and each
activation vector loaded once feeds four rows: 1.6-2x faster per nonzero).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from spdy.kernels._simd import (
    copy_n,
    ld,
    transpose16,
    vadd,
    vbroadcast,
    vfma,
    vload,
    vmax,
    vmin,
    vmul,
    vrsqrt,
    vstore,
    zero_n,
)
from spdy.kernels.activation import gelu_range

TILE = 64  # tokens per full register tile: 4 vectors of 16 lanes
LANES = 16

_JIT = dict(cache=True, fastmath=True, boundscheck=False, nogil=True)
# Numba does not let LLVM inline one jitted function into another reliably (each
# array argument is passed as a 7-field struct); the per-row micro-kernels are
# inlined at the Numba IR level instead, which also lets LLVM keep their
# accumulators in registers.
_INLINE = dict(_JIT, inline="always")


def padded_tokens_py(T: int) -> int:
    """:func:`padded_tokens` without the Numba dispatch (for the Python wrappers)."""
    full, rem = divmod(T, TILE)
    return full * TILE + (0 if rem == 0 else 16 if rem <= 16 else 32 if rem <= 32 else 64)


@njit(**_JIT)
def tile_width(T: int, t0: int) -> int:
    """Tokens in the tile that starts at ``t0``: 64, or 16/32/64 for the last one."""
    rem = T - t0
    if rem > 32:
        return 64
    if rem > 16:
        return 32
    return 16


@njit(**_JIT)
def padded_tokens(T: int) -> int:
    """Sum of the tile widths covering ``T`` tokens."""
    t0 = 0
    while t0 < T:
        t0 += tile_width(T, t0)
    return t0


# ----------------------------------------------------------------------------
# micro-kernels: one output row of one token tile over the nonzeros k0:k1
# ----------------------------------------------------------------------------


@njit(**_INLINE)
def _row64(col, val, k0, k1, mult, X, xb, Y, yb, first, b):
    """Y[yb:yb+64] (+)= sum_k val[k] * X[xb + col[k]*mult : +64]; bias ``b`` when ``first``.

    No early exit for empty rows: a ``return`` inside a function Numba inlines
    made the whole tile loop 2.5x slower at 95% sparsity (measured).
    """
    if first:
        a0 = vbroadcast(b)
        a1 = a0
        a2 = a0
        a3 = a0
    else:
        a0 = vload(Y, yb)
        a1 = vload(Y, yb + 16)
        a2 = vload(Y, yb + 32)
        a3 = vload(Y, yb + 48)
    for k in range(k0, k1):
        off = xb + np.int64(ld(col, k)) * mult
        w = vbroadcast(ld(val, k))
        a0 = vfma(a0, w, vload(X, off))
        a1 = vfma(a1, w, vload(X, off + 16))
        a2 = vfma(a2, w, vload(X, off + 32))
        a3 = vfma(a3, w, vload(X, off + 48))
    vstore(Y, yb, a0)
    vstore(Y, yb + 16, a1)
    vstore(Y, yb + 32, a2)
    vstore(Y, yb + 48, a3)


@njit(**_INLINE)
def _row32(col, val, k0, k1, mult, X, xb, Y, yb, first, b):
    if first:
        a0 = vbroadcast(b)
        a1 = a0
    else:
        a0 = vload(Y, yb)
        a1 = vload(Y, yb + 16)
    for k in range(k0, k1):
        off = xb + np.int64(ld(col, k)) * mult
        w = vbroadcast(ld(val, k))
        a0 = vfma(a0, w, vload(X, off))
        a1 = vfma(a1, w, vload(X, off + 16))
    vstore(Y, yb, a0)
    vstore(Y, yb + 16, a1)


@njit(**_INLINE)
def _row16(col, val, k0, k1, mult, X, xb, Y, yb, first, b):
    if first:
        a0 = vbroadcast(b)
    else:
        a0 = vload(Y, yb)
    for k in range(k0, k1):
        off = xb + np.int64(ld(col, k)) * mult
        a0 = vfma(a0, vbroadcast(ld(val, k)), vload(X, off))
    vstore(Y, yb, a0)


@njit(**_INLINE)
def _row64_b4(col, val, k0, k1, mult, X, xb, Y, yb, first, b):
    """Blocked-4: entry k covers columns col[k]*4 .. col[k]*4+3 with weights val[4k:4k+4]."""
    if first:
        a0 = vbroadcast(b)
        a1 = a0
        a2 = a0
        a3 = a0
    else:
        a0 = vload(Y, yb)
        a1 = vload(Y, yb + 16)
        a2 = vload(Y, yb + 32)
        a3 = vload(Y, yb + 48)
    for k in range(k0, k1):
        off = xb + np.int64(ld(col, k)) * (4 * mult)
        for q in range(4):
            w = vbroadcast(ld(val, 4 * k + q))
            o2 = off + q * mult
            a0 = vfma(a0, w, vload(X, o2))
            a1 = vfma(a1, w, vload(X, o2 + 16))
            a2 = vfma(a2, w, vload(X, o2 + 32))
            a3 = vfma(a3, w, vload(X, o2 + 48))
    vstore(Y, yb, a0)
    vstore(Y, yb + 16, a1)
    vstore(Y, yb + 32, a2)
    vstore(Y, yb + 48, a3)


@njit(**_INLINE)
def _row32_b4(col, val, k0, k1, mult, X, xb, Y, yb, first, b):
    if first:
        a0 = vbroadcast(b)
        a1 = a0
    else:
        a0 = vload(Y, yb)
        a1 = vload(Y, yb + 16)
    for k in range(k0, k1):
        off = xb + np.int64(ld(col, k)) * (4 * mult)
        for q in range(4):
            w = vbroadcast(ld(val, 4 * k + q))
            o2 = off + q * mult
            a0 = vfma(a0, w, vload(X, o2))
            a1 = vfma(a1, w, vload(X, o2 + 16))
    vstore(Y, yb, a0)
    vstore(Y, yb + 16, a1)


@njit(**_INLINE)
def _row16_b4(col, val, k0, k1, mult, X, xb, Y, yb, first, b):
    if first:
        a0 = vbroadcast(b)
    else:
        a0 = vload(Y, yb)
    for k in range(k0, k1):
        off = xb + np.int64(ld(col, k)) * (4 * mult)
        for q in range(4):
            a0 = vfma(a0, vbroadcast(ld(val, 4 * k + q)), vload(X, off + q * mult))
    vstore(Y, yb, a0)


# ----------------------------------------------------------------------------
# activations in, results out
# ----------------------------------------------------------------------------


@njit(**_INLINE)
def _pack_block(x, T, K, XP, base, t0, Lt, i0, l0):
    """One 16x16 block of X[t0+l0 : +16, i0 : +16] into the tile [K, Lt] at XP[base:]."""
    if i0 + LANES <= K and t0 + l0 + LANES <= T:
        transpose16(x, (t0 + l0) * K + i0, K, XP, base + i0 * Lt + l0, Lt)
    else:
        for i in range(i0, min(i0 + LANES, K)):
            for l in range(l0, l0 + LANES):
                t = t0 + l
                XP[base + i * Lt + l] = x[t * K + i] if t < T else np.float32(0.0)


@njit(**_INLINE)
def _pack_tile(x, T, K, XP, base, t0, Lt):
    """Tokens t0 .. t0+Lt of X [T, K] into the tile [K, Lt] at XP[base:], zero past T."""
    for i0 in range(0, K, LANES):
        for l0 in range(0, Lt, LANES):
            _pack_block(x, T, K, XP, base, t0, Lt, i0, l0)


@njit(**_INLINE)
def _unpack_rows_tokens_major(YP, yb, Lt, O, y, t0, T, r0, r1):
    """Y[t0 + l, o] = YP[yb + o*Lt + l] for rows r0 <= o < r1 of this tile (16x16 transposes)."""
    # token blocks outside, channel blocks inside: consecutive blocks then write
    # neighbouring cache lines; the other order writes 64 rows of one column
    # block at a stride of 4*O bytes, which maps them onto one or two L1 sets
    # when O is a multiple of 512 (measured 5x slower at O=1024, 1536, 2048).
    nl = min(Lt, T - t0)
    for l0 in range(0, nl, LANES):
        for o0 in range(r0, r1, LANES):
            if o0 + LANES <= r1 and l0 + LANES <= nl:
                transpose16(YP, yb + o0 * Lt + l0, Lt, y, (t0 + l0) * O + o0, O)
            else:
                for o in range(o0, min(o0 + LANES, r1)):
                    for l in range(l0, min(l0 + LANES, nl)):
                        y[(t0 + l) * O + o] = YP[yb + o * Lt + l]


EPI_NONE, EPI_ADD, EPI_CLAMP, EPI_ADD_CLAMP = 0, 1, 2, 3
"""What a convolution's epilogue does to each output as it is written (``epi`` of the kernels
below): nothing, ``+ r`` (a residual of the output's shape), clamp to ``[lo, hi]``, or both,
the sum first."""


@njit(**_INLINE)
def _epilogue_v(v, r, i, epi, vlo, vhi):
    """The epilogue ``epi`` on the 16 values ``v`` whose residual is ``r[i:i+16]``."""
    if epi & EPI_ADD:
        v = vadd(v, vload(r, i))
    if epi & EPI_CLAMP:
        v = vmin(vmax(v, vlo), vhi)
    return v


@njit(**_INLINE)
def _epilogue_s(x, r, i, epi, lo, hi):
    """The epilogue ``epi`` on the one value ``x`` whose residual is ``r[i]``."""
    if epi & EPI_ADD:
        x += ld(r, i)
    if epi & EPI_CLAMP:
        x = min(max(x, lo), hi)
    return x


@njit(**_INLINE)
def _store_run(y, d, src, s, n, r, epi, lo, hi):
    """``y[d:d+n] = src[s:s+n]``, with the epilogue ``epi`` (:data:`EPI_ADD` etc.: ``+ r[d:d+n]``,
    then clamp to ``[lo, hi]``) applied as the values are written, 16 lanes at a time."""
    if epi == EPI_NONE:
        copy_n(y, d, src, s, n)
        return
    vlo, vhi = vbroadcast(lo), vbroadcast(hi)
    i = 0
    while i + LANES <= n:
        vstore(y, d + i, _epilogue_v(vload(src, s + i), r, d + i, epi, vlo, vhi))
        i += LANES
    while i < n:
        y[d + i] = _epilogue_s(ld(src, s + i), r, d + i, epi, lo, hi)
        i += 1


@njit(**_INLINE)
def _epilogue_inplace(y, d, n, r, epi, lo, hi):
    """``y[d:d+n] = clamp(y[d:d+n] + r[d:d+n])``, the parts :data:`EPI_ADD` / :data:`EPI_CLAMP` of ``epi`` select."""
    if epi != EPI_NONE:
        _store_run(y, d, y, d, n, r, epi, lo, hi)


@njit(**_INLINE)
def _unpack_rows_nhwc(YP, yb, Lt, y, t0, T, r0, r1, grid_w, valid_w, O, res, epi, lo, hi):
    """Rows r0:r1 of a conv's tile into y [Ho, Wo, O] (channels last): token ``t`` is pixel
    (t // grid_w, t % grid_w) of the output grid, columns >= valid_w are padding and dropped;
    16x16 transposes, then the epilogue ``epi`` of :func:`_store_run` on what was written
    (the residual ``res`` indexed as ``y``)."""
    nl = min(Lt, T - t0)
    l = 0
    while l < nl:
        t = t0 + l
        row = t // grid_w
        col = t - row * grid_w
        run = min(nl - l, grid_w - col)
        keep = min(run, max(0, valid_w - col))
        k = 0
        while k < keep:
            nk = min(LANES, keep - k)
            d = (row * valid_w + col + k) * O
            for o0 in range(r0, r1, LANES):
                no = min(LANES, r1 - o0)
                if nk == LANES and no == LANES:
                    transpose16(YP, yb + o0 * Lt + l + k, Lt, y, d + o0, O)
                else:
                    for q in range(no):
                        for kk in range(nk):
                            y[d + kk * O + o0 + q] = YP[yb + (o0 + q) * Lt + l + k + kk]
            if epi != EPI_NONE:
                for kk in range(nk):
                    _epilogue_inplace(y, d + kk * O + r0, r1 - r0, res, epi, lo, hi)
            k += LANES
        l += run


@njit(**_INLINE)
def _unpack_rows_channel_major(YP, yb, Lt, y, t0, T, r0, r1, plane, grid_w, valid_w, res, epi, lo, hi):
    """Y[o, token] for a conv: token ``t`` is pixel (t // grid_w, t % grid_w) of the output
    grid; columns >= valid_w are padding and dropped; y[o * plane + row * valid_w + col]
    (with the epilogue ``epi`` of :func:`_store_run`; the residual ``res`` is indexed as ``y``)."""
    nl = min(Lt, T - t0)
    r_start = t0 // grid_w
    c_start = t0 - r_start * grid_w
    for o in range(r0, r1):
        src = yb + o * Lt
        dst = o * plane
        r = r_start
        c = c_start
        l = 0
        while l < nl:
            run = min(nl - l, grid_w - c)
            keep = min(run, max(0, valid_w - c))
            d = dst + r * valid_w + c
            if keep > 0:
                _store_run(y, d, YP, src + l, keep, res, epi, lo, hi)
            l += run
            r += 1
            c = 0


@njit(**_JIT)
def _row_chunks(row_cost, O, n):
    """Split rows 0..O into ``n`` contiguous chunks of equal cost, bounds rounded to 16."""
    b = np.empty(n + 1, np.int64)
    b[0] = 0
    b[n] = O
    total = row_cost[O]
    for c in range(1, n):
        r = np.searchsorted(row_cost, total * c // n)
        r = (r + LANES // 2) // LANES * LANES
        b[c] = min(max(r, b[c - 1]), O)
    return b


@njit(**_INLINE)
def _rows4_64(col, val, k0, k1, mult, X, xb, Y, yb, Lt, first, b0, b1, b2, b3):
    """4x1 blocks: rows o..o+3 (at Y[yb + q*Lt]) share each column; entry k holds their 4 weights.

    16 accumulators; every activation vector loaded feeds 4 FMAs (unstructured: 1).
    """
    if first:
        a0 = vbroadcast(b0)
        a1 = a0
        a2 = a0
        a3 = a0
        c0 = vbroadcast(b1)
        c1 = c0
        c2 = c0
        c3 = c0
        d0 = vbroadcast(b2)
        d1 = d0
        d2 = d0
        d3 = d0
        e0 = vbroadcast(b3)
        e1 = e0
        e2 = e0
        e3 = e0
    else:
        a0 = vload(Y, yb)
        a1 = vload(Y, yb + 16)
        a2 = vload(Y, yb + 32)
        a3 = vload(Y, yb + 48)
        c0 = vload(Y, yb + Lt)
        c1 = vload(Y, yb + Lt + 16)
        c2 = vload(Y, yb + Lt + 32)
        c3 = vload(Y, yb + Lt + 48)
        d0 = vload(Y, yb + 2 * Lt)
        d1 = vload(Y, yb + 2 * Lt + 16)
        d2 = vload(Y, yb + 2 * Lt + 32)
        d3 = vload(Y, yb + 2 * Lt + 48)
        e0 = vload(Y, yb + 3 * Lt)
        e1 = vload(Y, yb + 3 * Lt + 16)
        e2 = vload(Y, yb + 3 * Lt + 32)
        e3 = vload(Y, yb + 3 * Lt + 48)
    for k in range(k0, k1):
        off = xb + np.int64(ld(col, k)) * mult
        x0 = vload(X, off)
        x1 = vload(X, off + 16)
        x2 = vload(X, off + 32)
        x3 = vload(X, off + 48)
        w = vbroadcast(ld(val, 4 * k))
        a0 = vfma(a0, w, x0)
        a1 = vfma(a1, w, x1)
        a2 = vfma(a2, w, x2)
        a3 = vfma(a3, w, x3)
        w = vbroadcast(ld(val, 4 * k + 1))
        c0 = vfma(c0, w, x0)
        c1 = vfma(c1, w, x1)
        c2 = vfma(c2, w, x2)
        c3 = vfma(c3, w, x3)
        w = vbroadcast(ld(val, 4 * k + 2))
        d0 = vfma(d0, w, x0)
        d1 = vfma(d1, w, x1)
        d2 = vfma(d2, w, x2)
        d3 = vfma(d3, w, x3)
        w = vbroadcast(ld(val, 4 * k + 3))
        e0 = vfma(e0, w, x0)
        e1 = vfma(e1, w, x1)
        e2 = vfma(e2, w, x2)
        e3 = vfma(e3, w, x3)
    vstore(Y, yb, a0)
    vstore(Y, yb + 16, a1)
    vstore(Y, yb + 32, a2)
    vstore(Y, yb + 48, a3)
    vstore(Y, yb + Lt, c0)
    vstore(Y, yb + Lt + 16, c1)
    vstore(Y, yb + Lt + 32, c2)
    vstore(Y, yb + Lt + 48, c3)
    vstore(Y, yb + 2 * Lt, d0)
    vstore(Y, yb + 2 * Lt + 16, d1)
    vstore(Y, yb + 2 * Lt + 32, d2)
    vstore(Y, yb + 2 * Lt + 48, d3)
    vstore(Y, yb + 3 * Lt, e0)
    vstore(Y, yb + 3 * Lt + 16, e1)
    vstore(Y, yb + 3 * Lt + 32, e2)
    vstore(Y, yb + 3 * Lt + 48, e3)


@njit(**_INLINE)
def _rows4_16(col, val, k0, k1, mult, X, xb, Y, yb, Lt, first, b0, b1, b2, b3):
    """4x1 blocks on a 16- or 32-token tile: one vector per row per pass (``nv`` passes of 16 tokens)."""
    for v in range(0, Lt, 16):
        if first:
            a0 = vbroadcast(b0)
            c0 = vbroadcast(b1)
            d0 = vbroadcast(b2)
            e0 = vbroadcast(b3)
        else:
            a0 = vload(Y, yb + v)
            c0 = vload(Y, yb + Lt + v)
            d0 = vload(Y, yb + 2 * Lt + v)
            e0 = vload(Y, yb + 3 * Lt + v)
        for k in range(k0, k1):
            x0 = vload(X, xb + np.int64(ld(col, k)) * mult + v)
            a0 = vfma(a0, vbroadcast(ld(val, 4 * k)), x0)
            c0 = vfma(c0, vbroadcast(ld(val, 4 * k + 1)), x0)
            d0 = vfma(d0, vbroadcast(ld(val, 4 * k + 2)), x0)
            e0 = vfma(e0, vbroadcast(ld(val, 4 * k + 3)), x0)
        vstore(Y, yb + v, a0)
        vstore(Y, yb + Lt + v, c0)
        vstore(Y, yb + 2 * Lt + v, d0)
        vstore(Y, yb + 3 * Lt + v, e0)


@njit(**_JIT)
def _tile4x1(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt):
    """4x1-blocked format over rows r0:r1 (multiples of 4); ``ptr`` indexes row groups (O // 4 per panel)."""
    G = O // 4
    for p in range(n_panels):
        pp = p * G
        first = p == 0
        for g in range(r0 // 4, r1 // 4):
            k0 = ld(ptr, pp + g)
            k1 = ld(ptr, pp + g + 1)
            if first or k1 > k0:
                o = 4 * g
                if Lt == 64:
                    _rows4_64(col, val, k0, k1, mult, XP, xb, YP, yb + o * Lt, Lt, first,
                              ld(bias, o), ld(bias, o + 1), ld(bias, o + 2), ld(bias, o + 3))
                else:
                    _rows4_16(col, val, k0, k1, mult, XP, xb, YP, yb + o * Lt, Lt, first,
                              ld(bias, o), ld(bias, o + 1), ld(bias, o + 2), ld(bias, o + 3))


# One function per (tile width, format): the row loop must stay free of
# dispatch branches, or LLVM spills the accumulators' bookkeeping around every
# row (measured 2-3x slower at 95% sparsity, where rows have few nonzeros).
@njit(**_JIT)
def _tile64(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt):
    for p in range(n_panels):
        pp = p * O
        first = p == 0
        for o in range(r0, r1):
            k0 = ld(ptr, pp + o)
            k1 = ld(ptr, pp + o + 1)
            if first or k1 > k0:
                _row64(col, val, k0, k1, mult, XP, xb, YP, yb + o * Lt, first, ld(bias, o))


@njit(**_JIT)
def _tile32(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt):
    for p in range(n_panels):
        pp = p * O
        first = p == 0
        for o in range(r0, r1):
            k0 = ld(ptr, pp + o)
            k1 = ld(ptr, pp + o + 1)
            if first or k1 > k0:
                _row32(col, val, k0, k1, mult, XP, xb, YP, yb + o * Lt, first, ld(bias, o))


@njit(**_JIT)
def _tile16(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt):
    for p in range(n_panels):
        pp = p * O
        first = p == 0
        for o in range(r0, r1):
            k0 = ld(ptr, pp + o)
            k1 = ld(ptr, pp + o + 1)
            if first or k1 > k0:
                _row16(col, val, k0, k1, mult, XP, xb, YP, yb + o * Lt, first, ld(bias, o))


@njit(**_JIT)
def _tile64_b4(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt):
    for p in range(n_panels):
        pp = p * O
        first = p == 0
        for o in range(r0, r1):
            k0 = ld(ptr, pp + o)
            k1 = ld(ptr, pp + o + 1)
            if first or k1 > k0:
                _row64_b4(col, val, k0, k1, mult, XP, xb, YP, yb + o * Lt, first, ld(bias, o))


@njit(**_JIT)
def _tile32_b4(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt):
    for p in range(n_panels):
        pp = p * O
        first = p == 0
        for o in range(r0, r1):
            k0 = ld(ptr, pp + o)
            k1 = ld(ptr, pp + o + 1)
            if first or k1 > k0:
                _row32_b4(col, val, k0, k1, mult, XP, xb, YP, yb + o * Lt, first, ld(bias, o))


@njit(**_JIT)
def _tile16_b4(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt):
    for p in range(n_panels):
        pp = p * O
        first = p == 0
        for o in range(r0, r1):
            k0 = ld(ptr, pp + o)
            k1 = ld(ptr, pp + o + 1)
            if first or k1 > k0:
                _row16_b4(col, val, k0, k1, mult, XP, xb, YP, yb + o * Lt, first, ld(bias, o))


@njit(**_JIT)
def _tile_rows(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt, blocked):
    """Rows r0:r1 of one token tile of width ``Lt`` into YP[yb + o*Lt:], in the weight's format.

    A separate, non-parallel function on purpose: inside a Numba parfor body
    LLVM reloads the array pointers around every row.
    """
    if blocked == 2:
        _tile4x1(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt)
    elif blocked == 0:
        if Lt == 64:
            _tile64(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt)
        elif Lt == 32:
            _tile32(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt)
        else:
            _tile16(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt)
    else:
        if Lt == 64:
            _tile64_b4(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt)
        elif Lt == 32:
            _tile32_b4(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt)
        else:
            _tile16_b4(col, val, ptr, n_panels, O, r0, r1, mult, XP, xb, YP, yb, bias, Lt)


@njit(**_JIT)
def _spmm_rows(XP, T, K, O, ptr, n_panels, col, val, blocked, bias, YP, y, r0, r1):
    """Rows r0:r1 of Y = X W^T + b for every token tile of the packed X, written to y [T, O].

    X is in the token-tile layout (``XP[t0*K + j*Lt + l] = X[t0+l, j]``, see
    :func:`linear_forward_serial`; ``col`` holds columns, offset = t0*K + col*Lt).
    ``blocked``: 0 = one weight per entry, 1 = 1x4 blocks (4 inputs), 2 = 4x1
    blocks (4 output rows; O a multiple of 4).
    """
    t0 = 0
    while t0 < T:
        Lt = tile_width(T, t0)
        yb = t0 * O
        _tile_rows(col, val, ptr, n_panels, O, r0, r1, Lt, XP, t0 * K, YP, yb, bias, Lt, blocked)
        _unpack_rows_tokens_major(YP, yb, Lt, O, y, t0, T, r0, r1)
        t0 += Lt


@njit(**_JIT)
def linear_forward_serial(x, T, K, O, ptr, n_panels, col, val, blocked, bias, row_cost, XP, YP, y):
    """A whole Linear call on the calling thread, without an OpenMP region (~1 us each):
    relay X into token tiles (``XP[t0*K + j*Lt + l] = X[t0 + l, j]``, zero past T),
    multiply, write Y [T, O]. ``x``/``y`` are the flattened [T, K] input and [T, O]
    output; ``XP``/``YP`` 64-byte aligned scratch of at least padded_tokens(T) * K
    and padded_tokens(T) * O floats."""
    n_tiles = (T + TILE - 1) // TILE
    for tile in range(n_tiles):
        t0 = tile * TILE
        _pack_tile(x, T, K, XP, t0 * K, t0, tile_width(T, t0))
    _spmm_rows(XP, T, K, O, ptr, n_panels, col, val, blocked, bias, YP, y, 0, O)


@njit(**_INLINE)
def _segment(t0, l, nl, HW):
    """(image, pixel, run) of token t0 + l of a tile of nl tokens over images of HW pixels:
    the run is how many of the tile's tokens from there lie in that image."""
    t = t0 + l
    n = t // HW
    p = t - n * HW
    return n, p, min(nl - l, HW - p)


@njit(**_INLINE)
def _work_share(c, nthreads, n_tiles, per_tile, bounds, O):
    """(first tile, end tile, first row, end row) of work item ``c`` of ``nthreads``: a run of
    tiles with every row (``per_tile == 1``), or one tile's chunk ``bounds`` of its rows."""
    if per_tile == 1:
        return n_tiles * c // nthreads, n_tiles * (c + 1) // nthreads, 0, O
    lo = c // per_tile
    return lo, min(lo + 1, n_tiles), bounds[c - lo * per_tile], bounds[c - lo * per_tile + 1]


@njit(**_INLINE)
def _pack_channel_major(x, HW, K, XP, xs, t0, nl, Lt):
    """Tokens t0 .. t0+nl of X stored channel-major per image (x [N, K, HW], token
    t = pixel t % HW of image t // HW) into the tile [K, Lt] at XP[xs:], zero past nl."""
    l = 0
    while l < nl:
        n, p, run = _segment(t0, l, nl, HW)
        src = n * K * HW + p
        for j in range(K):
            copy_n(XP, xs + j * Lt + l, x, src + j * HW, run)
        l += run
    if nl < Lt:
        for j in range(K):
            zero_n(XP, xs + j * Lt + nl, Lt - nl)


@njit(**_INLINE)
def _unpack_channel_major(YP, yb, Lt, y, HW, O, t0, nl, r0, r1, res, epi, lo, hi):
    """Rows r0:r1 of the tile at YP[yb + o*Lt:] into y [N, O, HW] (token t = pixel t % HW of image t // HW),
    with the epilogue ``epi`` of :func:`_store_run` (the residual ``res`` indexed as ``y``)."""
    l = 0
    while l < nl:
        n, p, run = _segment(t0, l, nl, HW)
        dst = n * O * HW + p
        for o in range(r0, r1):
            _store_run(y, dst + o * HW, YP, yb + o * Lt + l, run, res, epi, lo, hi)
        l += run


@njit(**_INLINE)
def _tile_split(T, O, row_cost, nthreads):
    """(token tiles, threads per tile, their row bounds) of :func:`tiles_forward`'s work split."""
    n_tiles = (T + TILE - 1) // TILE
    per_tile = max(1, nthreads // n_tiles)
    return n_tiles, per_tile, _row_chunks(row_cost, O, per_tile)


@njit(**_INLINE)
def _tiles_thread(c, x, channel_major, T, HW, K, O, ptr, n_panels, col, val, blocked, bias, XP, YP, y, nthreads,
                  n_tiles, per_tile, bounds, res, epi, elo, ehi):
    """Work item ``c`` of :func:`tiles_forward` / :func:`tiles_forward_epilogue`."""
    lo, hi, r0, r1 = _work_share(c, nthreads, n_tiles, per_tile, bounds, O)
    xs = c * K * TILE
    ys = c * O * TILE
    for tile in range(lo, hi):
        if r1 <= r0:
            break
        t0 = tile * TILE
        Lt = tile_width(T, t0)
        nl = min(Lt, T - t0)
        if channel_major:
            _pack_channel_major(x, HW, K, XP, xs, t0, nl, Lt)
        else:
            _pack_tile(x, T, K, XP, xs, t0, Lt)
        # the thread's [O, Lt] buffer holds rows r0:r1 from its start
        yb = ys - r0 * Lt
        _tile_rows(col, val, ptr, n_panels, O, r0, r1, Lt, XP, xs, YP, yb, bias, Lt, blocked)
        if channel_major:
            _unpack_channel_major(YP, yb, Lt, y, HW, O, t0, nl, r0, r1, res, epi, elo, ehi)
        else:
            _unpack_rows_tokens_major(YP, yb, Lt, O, y, t0, T, r0, r1)
            if epi != EPI_NONE:  # on the rows just written, still in this core's cache
                for l in range(nl):
                    _epilogue_inplace(y, (t0 + l) * O + r0, r1 - r0, res, epi, elo, ehi)


@njit(parallel=True, **_JIT)
def tiles_forward(x, channel_major, N, HW, K, O, ptr, n_panels, col, val, blocked, bias, row_cost, XP, YP, y, nthreads):
    """Y = X W^T + b, the token tiles split between threads: one dispatch, nothing shared.

    With at least as many tiles as threads, each thread takes a contiguous run
    of tiles and computes every output row of each: it packs the tile into its
    own [K, Lt] buffer, multiplies into its own [O, Lt] buffer and writes that
    out, so both buffers stay in its core's L1/L2 and it reads only its share
    of X. With fewer tiles than threads, the threads of one tile split its
    rows (equal work, :func:`_row_chunks`), each packing its own copy of the
    tile. Splitting only the rows, every thread reads the tile another core
    packed, across the cores' caches: measured 1.1-5x slower on two threads
    at 128 tokens, most at high sparsity and wide inputs.

    ``channel_major``: x is [N, K, HW] and y [N, O, HW] (a 1x1 convolution in
    NCHW; tiles run across image boundaries); otherwise x is [T, K] and y
    [T, O] with T = N * HW. ``XP``/``YP``: 64-byte aligned scratch of at
    least ``nthreads * K * TILE`` / ``nthreads * O * TILE`` floats.
    """
    T = N * HW
    n_tiles, per_tile, bounds = _tile_split(T, O, row_cost, nthreads)
    for c in prange(nthreads):
        _tiles_thread(c, x, channel_major, T, HW, K, O, ptr, n_panels, col, val, blocked, bias, XP, YP, y, nthreads,
                      n_tiles, per_tile, bounds, y, EPI_NONE, np.float32(0.0), np.float32(0.0))


@njit(parallel=True, **_JIT)
def tiles_forward_epilogue(x, channel_major, N, HW, K, O, ptr, n_panels, col, val, blocked, bias, row_cost, XP, YP, y,
                           nthreads, res, epi, elo, ehi):
    """:func:`tiles_forward` with an epilogue applied as the outputs are written (a convolution's:
    :func:`_store_run`'s ``r``, ``epi``, ``lo``, ``hi``; ``res`` indexed as ``y``). A separate
    entry point so that the Linear layers' calls pass no more arguments than they use."""
    T = N * HW
    n_tiles, per_tile, bounds = _tile_split(T, O, row_cost, nthreads)
    for c in prange(nthreads):
        _tiles_thread(c, x, channel_major, T, HW, K, O, ptr, n_panels, col, val, blocked, bias, XP, YP, y, nthreads,
                      n_tiles, per_tile, bounds, res, epi, elo, ehi)


@njit(**_JIT)
def _add_tile(Y, yb, X, xb, n):
    """Y[yb:yb+n] += X[xb:xb+n] (two tiles of one layout; n a multiple of 16)."""
    for i in range(0, n, LANES):
        vstore(Y, yb + i, vadd(vload(Y, yb + i), vload(X, xb + i)))


@njit(**_INLINE)
def _layernorm16(Y, yb, O, Lt, gamma, beta, eps, l0):
    """LayerNorm of the 16 tokens at column ``l0`` of the tile Y[yb:] ([O, Lt]), in place."""
    inv = vbroadcast(np.float32(1.0 / O))
    ve = vbroadcast(np.float32(eps))
    minus = vbroadcast(np.float32(-1.0))
    acc = vbroadcast(np.float32(0.0))
    for o in range(O):
        acc = vadd(acc, vload(Y, yb + o * Lt + l0))
    neg = vmul(vmul(acc, inv), minus)
    var = vbroadcast(np.float32(0.0))
    for o in range(O):
        d = vadd(vload(Y, yb + o * Lt + l0), neg)
        var = vfma(var, d, d)
    rstd = vrsqrt(vfma(ve, var, inv))
    for o in range(O):
        i = yb + o * Lt + l0
        d = vmul(vadd(vload(Y, i), neg), rstd)
        vstore(Y, i, vfma(vbroadcast(beta[o]), d, vbroadcast(gamma[o])))


@njit(**_JIT)
def _layernorm_tile(Y, yb, O, Lt, gamma, beta, eps):
    """LayerNorm over the O channels of each token of the tile Y[yb:] ([O, Lt]), in place:
    ``(y - mean) / sqrt(var + eps) * gamma + beta`` (biased variance, two passes, as torch),
    16 tokens a vector. A full tile's four vectors go through each pass together: the sums are
    chains of dependent adds, and four independent ones keep the adder busy (measured on a
    384-channel tile: one chain at a time took 1.8x as long)."""
    if Lt != TILE:
        for l0 in range(0, Lt, LANES):
            _layernorm16(Y, yb, O, Lt, gamma, beta, eps, l0)
        return
    inv = vbroadcast(np.float32(1.0 / O))
    ve = vbroadcast(np.float32(eps))
    minus = vbroadcast(np.float32(-1.0))
    z = vbroadcast(np.float32(0.0))
    a0, a1, a2, a3 = z, z, z, z
    for o in range(O):
        i = yb + o * TILE
        a0, a1 = vadd(a0, vload(Y, i)), vadd(a1, vload(Y, i + 16))
        a2, a3 = vadd(a2, vload(Y, i + 32)), vadd(a3, vload(Y, i + 48))
    n0, n1 = vmul(vmul(a0, inv), minus), vmul(vmul(a1, inv), minus)
    n2, n3 = vmul(vmul(a2, inv), minus), vmul(vmul(a3, inv), minus)
    v0, v1, v2, v3 = z, z, z, z
    for o in range(O):
        i = yb + o * TILE
        d0, d1 = vadd(vload(Y, i), n0), vadd(vload(Y, i + 16), n1)
        d2, d3 = vadd(vload(Y, i + 32), n2), vadd(vload(Y, i + 48), n3)
        v0, v1, v2, v3 = vfma(v0, d0, d0), vfma(v1, d1, d1), vfma(v2, d2, d2), vfma(v3, d3, d3)
    r0, r1 = vrsqrt(vfma(ve, v0, inv)), vrsqrt(vfma(ve, v1, inv))
    r2, r3 = vrsqrt(vfma(ve, v2, inv)), vrsqrt(vfma(ve, v3, inv))
    for o in range(O):
        i = yb + o * TILE
        g, b = vbroadcast(gamma[o]), vbroadcast(beta[o])
        vstore(Y, i, vfma(b, vmul(vadd(vload(Y, i), n0), r0), g))
        vstore(Y, i + 16, vfma(b, vmul(vadd(vload(Y, i + 16), n1), r1), g))
        vstore(Y, i + 32, vfma(b, vmul(vadd(vload(Y, i + 32), n2), r2), g))
        vstore(Y, i + 48, vfma(b, vmul(vadd(vload(Y, i + 48), n3), r3), g))


@njit(parallel=True, **_JIT)
def ffn_forward(x, T, K, M, O, ptr1, np1, col1, val1, blk1, bias1, ptr2, np2, col2, val2, blk2, bias2,
                residual, norm, gamma, beta, eps, XP, HP, YP, y, nthreads):
    """Y = gelu(X W1^T + b1) W2^T + b2 (+ X) (then LayerNorm), two sparse layers chained in the tile layout.

    Each thread takes a contiguous run of token tiles and for each: packs the tile of X
    into its [K, Lt] buffer, multiplies by W1 into its [M, Lt] buffer, applies GELU there,
    multiplies that buffer (already the [M, Lt] layout the second kernel reads) by W2
    into its [O, Lt] buffer, adds the packed input when ``residual`` (O == K), normalises
    each token over its O channels when ``norm`` (``gamma``, ``beta``, ``eps``), and writes
    the tile out to y [T, O]. The hidden activations never leave the thread's caches and
    are never transposed; one dispatch runs both layers. ``XP``/``HP``/``YP``: 64-byte
    aligned scratch of ``nthreads * TILE`` times K / M / O floats. Needs at least as
    many tiles as threads to use them all (a thread without a tile idles).
    """
    n_tiles = (T + TILE - 1) // TILE
    for c in prange(nthreads):
        lo = n_tiles * c // nthreads
        hi = n_tiles * (c + 1) // nthreads
        xs = c * K * TILE
        hs = c * M * TILE
        ys = c * O * TILE
        for tile in range(lo, hi):
            t0 = tile * TILE
            Lt = tile_width(T, t0)
            _pack_tile(x, T, K, XP, xs, t0, Lt)
            _tile_rows(col1, val1, ptr1, np1, M, 0, M, Lt, XP, xs, HP, hs, bias1, Lt, blk1)
            gelu_range(HP, HP, hs, hs + M * Lt)
            _tile_rows(col2, val2, ptr2, np2, O, 0, O, Lt, HP, hs, YP, ys, bias2, Lt, blk2)
            if residual:
                _add_tile(YP, ys, XP, xs, O * Lt)
            if norm:
                _layernorm_tile(YP, ys, O, Lt, gamma, beta, eps)
            _unpack_rows_tokens_major(YP, ys, Lt, O, y, t0, T, 0, O)


@njit(parallel=True, **_JIT)
def residual_forward(x, r, T, K, O, ptr, n_panels, col, val, blocked, bias, norm, gamma, beta, eps, XP, RP, YP, y,
                     nthreads):
    """Y = X W^T + b + R (then LayerNorm): one sparse layer with the residual add and the LayerNorm
    after it in its epilogue (a transformer's attention output block).

    Each thread takes a contiguous run of token tiles and for each: packs the tile of X into
    its [K, Lt] buffer and the tile of R [T, O] into its [O, Lt] buffer, multiplies into its
    [O, Lt] output buffer, adds the packed residual, normalises each token over its O
    channels when ``norm`` (``gamma``, ``beta``, ``eps``) and writes the tile out to y [T, O].
    The sum never leaves the thread's caches; one dispatch instead of three operators.
    ``XP``/``RP``/``YP``: 64-byte aligned scratch of ``nthreads * TILE`` times K / O / O
    floats. Needs at least as many tiles as threads to use them all.
    """
    n_tiles = (T + TILE - 1) // TILE
    for c in prange(nthreads):
        lo = n_tiles * c // nthreads
        hi = n_tiles * (c + 1) // nthreads
        xs = c * K * TILE
        rs = c * O * TILE
        ys = c * O * TILE
        for tile in range(lo, hi):
            t0 = tile * TILE
            Lt = tile_width(T, t0)
            _pack_tile(x, T, K, XP, xs, t0, Lt)
            _tile_rows(col, val, ptr, n_panels, O, 0, O, Lt, XP, xs, YP, ys, bias, Lt, blocked)
            _pack_tile(r, T, O, RP, rs, t0, Lt)
            _add_tile(YP, ys, RP, rs, O * Lt)
            if norm:
                _layernorm_tile(YP, ys, O, Lt, gamma, beta, eps)
            _unpack_rows_tokens_major(YP, ys, Lt, O, y, t0, T, 0, O)


@njit(parallel=True, **_JIT)
def qkv_forward(x, T, K, O1, O2, O3, ptr1, np1, col1, val1, blk1, bias1, ptr2, np2, col2, val2, blk2, bias2,
                ptr3, np3, col3, val3, blk3, bias3, XP, YP, y, nthreads):
    """Y = [X W1^T + b1, X W2^T + b2, X W3^T + b3]: three sparse layers on one input (a
    self-attention's query, key and value projections) into y [T, O1 + O2 + O3].

    Each thread takes a contiguous run of token tiles and for each packs the tile of X once
    into its [K, Lt] buffer, multiplies it by the three weights into the rows of its one
    [O1 + O2 + O3, Lt] buffer and writes that out: one dispatch and one packing of X instead
    of three. ``XP``/``YP``: 64-byte aligned scratch of ``nthreads * TILE`` times K /
    (O1 + O2 + O3) floats. Needs at least as many tiles as threads to use them all.
    """
    O = O1 + O2 + O3
    n_tiles = (T + TILE - 1) // TILE
    for c in prange(nthreads):
        lo = n_tiles * c // nthreads
        hi = n_tiles * (c + 1) // nthreads
        xs = c * K * TILE
        ys = c * O * TILE
        for tile in range(lo, hi):
            t0 = tile * TILE
            Lt = tile_width(T, t0)
            _pack_tile(x, T, K, XP, xs, t0, Lt)
            _tile_rows(col1, val1, ptr1, np1, O1, 0, O1, Lt, XP, xs, YP, ys, bias1, Lt, blk1)
            _tile_rows(col2, val2, ptr2, np2, O2, 0, O2, Lt, XP, xs, YP, ys + O1 * Lt, bias2, Lt, blk2)
            _tile_rows(col3, val3, ptr3, np3, O3, 0, O3, Lt, XP, xs, YP, ys + (O1 + O2) * Lt, bias3, Lt, blk3)
            _unpack_rows_tokens_major(YP, ys, Lt, O, y, t0, T, 0, O)


# ----------------------------------------------------------------------------
# the same blocks on activations kept in the tile layout
# ----------------------------------------------------------------------------
#
# A transformer layer's parts can hand each other their activations in the tile layout the
# micro-kernels compute in, rather than as [tokens, channels] rows that every part packs into
# tiles and unpacks again. Each sequence's tokens go in tiles of ``tile_width`` (64, the last
# one 16, 32 or 64), the sequence padded to ``Tpad = padded_tokens(T)`` tokens; the tile at
# token ``t0`` of sequence ``b`` of a C-channel activation is the [C, Lt] block at
# ``C * (b * Tpad + t0)``. Pad tokens hold finite values that nothing reads back.


@njit(**_INLINE)
def _tile_unit(u, per_seq, T, Tpad):
    """Sequence, first token, width and row (``b * Tpad + t0``) of tile unit ``u``."""
    b = u // per_seq
    t0 = (u - b * per_seq) * TILE
    return b, t0, tile_width(T, t0), b * Tpad + t0


@njit(parallel=True, **_JIT)
def pack_tiles(x, B, T, Tpad, K, XT, nthreads):
    """x [B * T, K] (rows) -> XT, the tile layout of ``B`` sequences (pad tokens zero)."""
    per_seq = (T + TILE - 1) // TILE
    units = B * per_seq
    for c in prange(nthreads):
        for u in range(units * c // nthreads, units * (c + 1) // nthreads):
            b, t0, Lt, row = _tile_unit(u, per_seq, T, Tpad)
            _pack_tile(x[b * T * K:(b + 1) * T * K], T, K, XT, K * row, t0, Lt)


@njit(parallel=True, **_JIT)
def unpack_tiles(YT, B, T, Tpad, O, y, nthreads):
    """YT (the tile layout) -> y [B * T, O] (rows); pad tokens are dropped."""
    per_seq = (T + TILE - 1) // TILE
    units = B * per_seq
    for c in prange(nthreads):
        for u in range(units * c // nthreads, units * (c + 1) // nthreads):
            b, t0, Lt, row = _tile_unit(u, per_seq, T, Tpad)
            _unpack_rows_tokens_major(YT, O * row, Lt, O, y[b * T * O:(b + 1) * T * O], t0, T, 0, O)


@njit(parallel=True, **_JIT)
def linear_tiles(XT, B, T, Tpad, K, O, ptr, n_panels, col, val, blocked, bias, YT, nthreads):
    """One sparse layer from and to the tile layout: YT = XT W^T + b, [O, Lt] per tile."""
    per_seq = (T + TILE - 1) // TILE
    units = B * per_seq
    for c in prange(nthreads):
        for u in range(units * c // nthreads, units * (c + 1) // nthreads):
            b, t0, Lt, row = _tile_unit(u, per_seq, T, Tpad)
            _tile_rows(col, val, ptr, n_panels, O, 0, O, Lt, XT, K * row, YT, O * row, bias, Lt, blocked)


@njit(parallel=True, **_JIT)
def qkv_tiles(XT, B, T, Tpad, K, O1, O2, O3, ptr1, np1, col1, val1, blk1, bias1, ptr2, np2, col2, val2, blk2,
              bias2, ptr3, np3, col3, val3, blk3, bias3, YT, nthreads):
    """:func:`qkv_forward` from and to the tile layout: YT [O1 + O2 + O3, Lt] per tile."""
    O = O1 + O2 + O3
    per_seq = (T + TILE - 1) // TILE
    units = B * per_seq
    for c in prange(nthreads):
        for u in range(units * c // nthreads, units * (c + 1) // nthreads):
            b, t0, Lt, row = _tile_unit(u, per_seq, T, Tpad)
            xs, ys = K * row, O * row
            _tile_rows(col1, val1, ptr1, np1, O1, 0, O1, Lt, XT, xs, YT, ys, bias1, Lt, blk1)
            _tile_rows(col2, val2, ptr2, np2, O2, 0, O2, Lt, XT, xs, YT, ys + O1 * Lt, bias2, Lt, blk2)
            _tile_rows(col3, val3, ptr3, np3, O3, 0, O3, Lt, XT, xs, YT, ys + (O1 + O2) * Lt, bias3, Lt, blk3)


@njit(parallel=True, **_JIT)
def residual_tiles(XT, RT, B, T, Tpad, K, O, ptr, n_panels, col, val, blocked, bias, norm, gamma, beta, eps, YT,
                   nthreads):
    """:func:`residual_forward` from and to the tile layout: YT = XT W^T + b + RT (then LayerNorm)."""
    per_seq = (T + TILE - 1) // TILE
    units = B * per_seq
    for c in prange(nthreads):
        for u in range(units * c // nthreads, units * (c + 1) // nthreads):
            b, t0, Lt, row = _tile_unit(u, per_seq, T, Tpad)
            ys = O * row
            _tile_rows(col, val, ptr, n_panels, O, 0, O, Lt, XT, K * row, YT, ys, bias, Lt, blocked)
            _add_tile(YT, ys, RT, ys, O * Lt)
            if norm:
                _layernorm_tile(YT, ys, O, Lt, gamma, beta, eps)


@njit(parallel=True, **_JIT)
def ffn_tiles(XT, B, T, Tpad, K, M, O, ptr1, np1, col1, val1, blk1, bias1, ptr2, np2, col2, val2, blk2, bias2,
              residual, norm, gamma, beta, eps, HP, YT, nthreads):
    """:func:`ffn_forward` from and to the tile layout; the hidden tile in the thread's ``HP``
    scratch (``nthreads * TILE * M`` floats, 64-byte aligned)."""
    per_seq = (T + TILE - 1) // TILE
    units = B * per_seq
    for c in prange(nthreads):
        hs = c * M * TILE
        for u in range(units * c // nthreads, units * (c + 1) // nthreads):
            b, t0, Lt, row = _tile_unit(u, per_seq, T, Tpad)
            xs, ys = K * row, O * row
            _tile_rows(col1, val1, ptr1, np1, M, 0, M, Lt, XT, xs, HP, hs, bias1, Lt, blk1)
            gelu_range(HP, HP, hs, hs + M * Lt)
            _tile_rows(col2, val2, ptr2, np2, O, 0, O, Lt, HP, hs, YT, ys, bias2, Lt, blk2)
            if residual:
                _add_tile(YT, ys, XT, xs, O * Lt)
            if norm:
                _layernorm_tile(YT, ys, O, Lt, gamma, beta, eps)

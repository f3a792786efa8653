"""Numba kernel: softmax attention of one head at a time, ``softmax(Q K^T * scale + mask) V``.

Layout: ``q``, ``k`` and ``v`` are flat fp32 arrays holding [B, T, H, D]-strided
tensors (element (b, t, h, d) at ``off + b * bs + t * ts + h * D + d``), which is
how a transformer's Q/K/V projections lay out their outputs before the heads
are split; ``out`` is a C-contiguous [B, Tq, H, D]. Per (batch, head):

* the head's keys are transposed once into a [D, Tkp] scratch (``Tkp``: the
  keys rounded up to 16), so that one query element multiplies a contiguous
  row of 16-key vectors;
* the head's values are copied once into a contiguous [Tk, D] scratch: in
  place, consecutive keys' rows lie ``vs`` floats apart (3 x 384 in a fused
  MiniLM projection output, 4.5 KiB), which maps the rows of one head onto a
  few L1 sets, and ``P V`` then reads them from L2 (measured: ``P V`` took
  twice the time of ``Q K^T``, the same number of FMAs, until the copy);
* query rows go in blocks of four: each key vector loaded feeds four rows'
  accumulators (scores), and each value row loaded feeds four rows' output
  accumulators (``P V``), eight 16-lane accumulators in both phases;
* the softmax runs on the four score rows in scratch, with a vectorised
  exp (:func:`spdy.kernels._simd.vexp`); the normalisation is folded into the
  output store.

Masked scores are :data:`NEG` (a large finite negative, not -inf, so that no
infinity or NaN ever enters the arithmetic); a row whose every key is masked
gives zeros. Threads take whole (batch, head) units.
"""

from __future__ import annotations

from numba import njit, prange

from spdy.kernels._simd import (
    hmax, hsum, ld, transpose16, vadd, vbroadcast, vexp, vfma, vload, vmax, vmul, vstore,
)
from spdy.kernels._spmm import tile_width

NEG = -1.0e30
"""The score of a masked (query, key) pair."""

# fast-math without the no-NaN/no-inf assumptions: the mask sentinel is compared
_FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}
_JIT = dict(cache=True, fastmath=_FLAGS, boundscheck=False, nogil=True)
_INLINE = dict(_JIT, inline="always")


def padded_keys(Tk: int) -> int:
    """Keys rounded up to a whole number of 16-lane vectors."""
    return -(-Tk // 16) * 16


@njit(**_JIT)
def _keys_transposed(k, koff, ks, Tk, D, scale, KT, kt, Tkp):
    """KT[kt + d * Tkp + j] = k[koff + j * ks + d] * scale; pad keys (j >= Tk) are zero."""
    j0 = 0
    while j0 + 16 <= Tk:
        for d0 in range(0, D, 16):
            transpose16(k, koff + j0 * ks + d0, ks, KT, kt + d0 * Tkp + j0, Tkp)
        j0 += 16
    for j in range(j0, Tkp):
        for d in range(D):
            KT[kt + d * Tkp + j] = ld(k, koff + j * ks + d) if j < Tk else 0.0
    sc = vbroadcast(scale)
    for i in range(kt, kt + D * Tkp, 16):
        vstore(KT, i, vmul(vload(KT, i), sc))


@njit(**_JIT)
def _values_copied(v, voff, vs, Tk, D, VC, vc):
    """VC[vc + j * D + d] = v[voff + j * vs + d]: the head's value rows side by side."""
    for j in range(Tk):
        for d0 in range(0, D, 16):
            vstore(VC, vc + j * D + d0, vload(v, voff + j * vs + d0))


@njit(**_INLINE)
def _scores32(q, q0, q1, q2, q3, KT, kt, Tkp, D, j0, S, s0):
    z = vbroadcast(0.0)
    a0, a1, b0, b1, c0, c1, e0, e1 = z, z, z, z, z, z, z, z
    for d in range(D):
        x0 = vload(KT, kt + d * Tkp + j0)
        x1 = vload(KT, kt + d * Tkp + j0 + 16)
        w = vbroadcast(ld(q, q0 + d))
        a0 = vfma(a0, w, x0)
        a1 = vfma(a1, w, x1)
        w = vbroadcast(ld(q, q1 + d))
        b0 = vfma(b0, w, x0)
        b1 = vfma(b1, w, x1)
        w = vbroadcast(ld(q, q2 + d))
        c0 = vfma(c0, w, x0)
        c1 = vfma(c1, w, x1)
        w = vbroadcast(ld(q, q3 + d))
        e0 = vfma(e0, w, x0)
        e1 = vfma(e1, w, x1)
    vstore(S, s0 + j0, a0)
    vstore(S, s0 + j0 + 16, a1)
    vstore(S, s0 + Tkp + j0, b0)
    vstore(S, s0 + Tkp + j0 + 16, b1)
    vstore(S, s0 + 2 * Tkp + j0, c0)
    vstore(S, s0 + 2 * Tkp + j0 + 16, c1)
    vstore(S, s0 + 3 * Tkp + j0, e0)
    vstore(S, s0 + 3 * Tkp + j0 + 16, e1)


@njit(**_INLINE)
def _scores16(q, q0, q1, q2, q3, KT, kt, Tkp, D, j0, S, s0):
    z = vbroadcast(0.0)
    a0, b0, c0, e0 = z, z, z, z
    for d in range(D):
        x0 = vload(KT, kt + d * Tkp + j0)
        a0 = vfma(a0, vbroadcast(ld(q, q0 + d)), x0)
        b0 = vfma(b0, vbroadcast(ld(q, q1 + d)), x0)
        c0 = vfma(c0, vbroadcast(ld(q, q2 + d)), x0)
        e0 = vfma(e0, vbroadcast(ld(q, q3 + d)), x0)
    vstore(S, s0 + j0, a0)
    vstore(S, s0 + Tkp + j0, b0)
    vstore(S, s0 + 2 * Tkp + j0, c0)
    vstore(S, s0 + 3 * Tkp + j0, e0)


@njit(**_INLINE)
def _shift(h):
    """The shift that makes a row's largest score 0 (0 for a row whose every key is masked)."""
    return vbroadcast(0.0 if h <= 0.5 * NEG else -h)


@njit(**_INLINE)
def _inverse(h, total):
    return 0.0 if h <= 0.5 * NEG else 1.0 / total


@njit(**_INLINE)
def _softmax4(S, s0, Tkp):
    """exp(score - row max) in place for the four rows at ``s0``, ``s0 + Tkp``, ...; returns each
    row's 1 / sum. The rows go through each pass together: four independent dependency chains."""
    s1, s2, s3 = s0 + Tkp, s0 + 2 * Tkp, s0 + 3 * Tkp
    m0, m1, m2, m3 = vload(S, s0), vload(S, s1), vload(S, s2), vload(S, s3)
    for j in range(16, Tkp, 16):
        m0 = vmax(m0, vload(S, s0 + j))
        m1 = vmax(m1, vload(S, s1 + j))
        m2 = vmax(m2, vload(S, s2 + j))
        m3 = vmax(m3, vload(S, s3 + j))
    h0, h1, h2, h3 = hmax(m0), hmax(m1), hmax(m2), hmax(m3)
    n0, n1, n2, n3 = _shift(h0), _shift(h1), _shift(h2), _shift(h3)
    z = vbroadcast(0.0)
    t0, t1, t2, t3 = z, z, z, z
    for j in range(0, Tkp, 16):
        e0 = vexp(vadd(vload(S, s0 + j), n0))
        e1 = vexp(vadd(vload(S, s1 + j), n1))
        e2 = vexp(vadd(vload(S, s2 + j), n2))
        e3 = vexp(vadd(vload(S, s3 + j), n3))
        vstore(S, s0 + j, e0)
        vstore(S, s1 + j, e1)
        vstore(S, s2 + j, e2)
        vstore(S, s3 + j, e3)
        t0 = vadd(t0, e0)
        t1 = vadd(t1, e1)
        t2 = vadd(t2, e2)
        t3 = vadd(t3, e3)
    return (_inverse(h0, hsum(t0)), _inverse(h1, hsum(t1)), _inverse(h2, hsum(t2)), _inverse(h3, hsum(t3)))


@njit(**_JIT)
def _head(q, qoff, qs, k, koff, ks, v, voff, vs, Tq, Tk, D, scale, bias, boff, has_bias, KT, kt, S, s0,
          VC, vc, out, ooff, os):
    """One (batch, head): rows of ``out`` at ``ooff + i * os`` (stride ``os`` between query rows).
    Scratch: the transposed keys at ``KT[kt:]``, four score rows at ``S[s0:]``, the values at ``VC[vc:]``."""
    Tkp = (Tk + 15) // 16 * 16
    _keys_transposed(k, koff, ks, Tk, D, scale, KT, kt, Tkp)
    _values_copied(v, voff, vs, Tk, D, VC, vc)
    for i0 in range(0, Tq, 4):
        # rows past the end repeat the last row and are not stored
        i1 = min(i0 + 1, Tq - 1)
        i2 = min(i0 + 2, Tq - 1)
        i3 = min(i0 + 3, Tq - 1)
        q0, q1, q2, q3 = qoff + i0 * qs, qoff + i1 * qs, qoff + i2 * qs, qoff + i3 * qs
        j0 = 0
        while j0 + 32 <= Tkp:
            _scores32(q, q0, q1, q2, q3, KT, kt, Tkp, D, j0, S, s0)
            j0 += 32
        if j0 < Tkp:
            _scores16(q, q0, q1, q2, q3, KT, kt, Tkp, D, j0, S, s0)
        for r in range(4):
            s = s0 + r * Tkp
            if has_bias:
                b = boff + (min(i0 + r, Tq - 1)) * Tkp
                for j in range(0, Tkp, 16):
                    vstore(S, s + j, vadd(vload(S, s + j), vload(bias, b + j)))
            else:
                for j in range(Tk, Tkp):
                    S[s + j] = NEG
        inv0, inv1, inv2, inv3 = _softmax4(S, s0, Tkp)
        for dc in range(0, D, 32):
            z = vbroadcast(0.0)
            a0, a1, b0, b1, c0, c1, e0, e1 = z, z, z, z, z, z, z, z
            for j in range(Tk):
                vo = vc + j * D + dc
                x0 = vload(VC, vo)
                x1 = vload(VC, vo + 16)
                w = vbroadcast(ld(S, s0 + j))
                a0 = vfma(a0, w, x0)
                a1 = vfma(a1, w, x1)
                w = vbroadcast(ld(S, s0 + Tkp + j))
                b0 = vfma(b0, w, x0)
                b1 = vfma(b1, w, x1)
                w = vbroadcast(ld(S, s0 + 2 * Tkp + j))
                c0 = vfma(c0, w, x0)
                c1 = vfma(c1, w, x1)
                w = vbroadcast(ld(S, s0 + 3 * Tkp + j))
                e0 = vfma(e0, w, x0)
                e1 = vfma(e1, w, x1)
            o = ooff + i0 * os + dc
            vstore(out, o, vmul(a0, vbroadcast(inv0)))
            vstore(out, o + 16, vmul(a1, vbroadcast(inv0)))
            if i0 + 1 < Tq:
                vstore(out, o + os, vmul(b0, vbroadcast(inv1)))
                vstore(out, o + os + 16, vmul(b1, vbroadcast(inv1)))
            if i0 + 2 < Tq:
                vstore(out, o + 2 * os, vmul(c0, vbroadcast(inv2)))
                vstore(out, o + 2 * os + 16, vmul(c1, vbroadcast(inv2)))
            if i0 + 3 < Tq:
                vstore(out, o + 3 * os, vmul(e0, vbroadcast(inv3)))
                vstore(out, o + 3 * os + 16, vmul(e1, vbroadcast(inv3)))


@njit(parallel=True, **_JIT)
def attention_forward(q, qoff, qbs, qs, k, koff, kbs, ks, v, voff, vbs, vs, B, H, Tq, Tk, D, scale,
                      bias, has_bias, work, out, nthreads):
    """``out`` [B, Tq, H, D] = softmax(Q K^T * scale + bias) V for every batch and head.

    ``q``/``k``/``v``: flat arrays, element (b, t, h, d) at ``off + b * bs + t * s + h * D + d``
    (``D`` a multiple of 32). ``bias``: [B, Tq, Tkp] additive scores (``NEG`` where masked, pad
    keys included) when ``has_bias``. ``work``: scratch of ``nthreads * (2 * D + 4) * Tkp`` floats,
    64-byte aligned. Threads take contiguous runs of (batch, head) units.
    """
    Tkp = (Tk + 15) // 16 * 16
    per = (2 * D + 4) * Tkp
    units = B * H
    for c in prange(nthreads):
        u0 = c * units // nthreads
        u1 = (c + 1) * units // nthreads
        kt = c * per
        for u in range(u0, u1):
            b = u // H
            h = u - b * H
            _head(q, qoff + b * qbs + h * D, qs, k, koff + b * kbs + h * D, ks, v, voff + b * vbs + h * D, vs,
                  Tq, Tk, D, scale, bias, b * Tq * Tkp, has_bias, work, kt, work, kt + D * Tkp,
                  work, kt + (D + 4) * Tkp, out, (b * Tq * H + h) * D, H * D)


# ----------------------------------------------------------------------------
# the attention on the token-tile layout of the sparse kernels
# ----------------------------------------------------------------------------
#
# In the tile layout (:mod:`spdy.kernels._spmm`) a sequence's tokens go in tiles of 64 (the
# last one 16, 32 or 64 wide, padded); tile ``(b, t0)`` of a C-channel activation lies at
# ``C * (b * Tpad + t0)`` as a [C, Lt] block: channel-major, 16 tokens a vector. A head's
# query rows of one tile are then already what the scores want (one vector holds one
# channel of 16 queries), and its key and value rows are read one scalar at a time and
# broadcast: no keys transposed, no values copied, and the softmax runs down the key axis
# with every reduction vertical (16 queries at a time). The scores of one (sequence, head,
# query tile) are a [Tpad, Lt] block: key-major, query lanes.


@njit(**_INLINE)
def _score_row(S, s, kb, x0, x1, x2, x3, sc):
    """S[s:s + 64] = kb + sc x the four vectors x (one key's scores of 64 queries)."""
    w = vbroadcast(kb)
    vstore(S, s, vfma(w, x0, sc))
    vstore(S, s + 16, vfma(w, x1, sc))
    vstore(S, s + 32, vfma(w, x2, sc))
    vstore(S, s + 48, vfma(w, x3, sc))


@njit(**_INLINE)
def _tile_scores4(X, qo, Lq, ko, Lk, D, S, so, scale, kb0, kb1, kb2, kb3):
    """Scores of 64 queries (the tile at ``qo``, row stride ``Lq``) against four consecutive keys
    (scalars at ``ko``, ``ko + 1``, ... of key rows ``Lk`` apart): ``S[so + r * Lq:]`` = scale x
    q . k_r + kb_r."""
    z = vbroadcast(0.0)
    a0, a1, a2, a3, b0, b1, b2, b3 = z, z, z, z, z, z, z, z
    c0, c1, c2, c3, e0, e1, e2, e3 = z, z, z, z, z, z, z, z
    for d in range(D):
        q = qo + d * Lq
        x0, x1, x2, x3 = vload(X, q), vload(X, q + 16), vload(X, q + 32), vload(X, q + 48)
        k = ko + d * Lk
        w = vbroadcast(ld(X, k))
        a0, a1, a2, a3 = vfma(a0, w, x0), vfma(a1, w, x1), vfma(a2, w, x2), vfma(a3, w, x3)
        w = vbroadcast(ld(X, k + 1))
        b0, b1, b2, b3 = vfma(b0, w, x0), vfma(b1, w, x1), vfma(b2, w, x2), vfma(b3, w, x3)
        w = vbroadcast(ld(X, k + 2))
        c0, c1, c2, c3 = vfma(c0, w, x0), vfma(c1, w, x1), vfma(c2, w, x2), vfma(c3, w, x3)
        w = vbroadcast(ld(X, k + 3))
        e0, e1, e2, e3 = vfma(e0, w, x0), vfma(e1, w, x1), vfma(e2, w, x2), vfma(e3, w, x3)
    sc = vbroadcast(scale)
    _score_row(S, so, kb0, a0, a1, a2, a3, sc)
    _score_row(S, so + Lq, kb1, b0, b1, b2, b3, sc)
    _score_row(S, so + 2 * Lq, kb2, c0, c1, c2, c3, sc)
    _score_row(S, so + 3 * Lq, kb3, e0, e1, e2, e3, sc)


@njit(**_INLINE)
def _tile_scores1(X, qo, Lq, ko, Lk, D, S, so, scale, kb0, kb1, kb2, kb3):
    """:func:`_tile_scores4` for 16 queries (one vector at ``qo``; scores at ``S[so + r * Lq:]``)."""
    z = vbroadcast(0.0)
    a0, b0, c0, e0 = z, z, z, z
    for d in range(D):
        x0 = vload(X, qo + d * Lq)
        k = ko + d * Lk
        a0 = vfma(a0, vbroadcast(ld(X, k)), x0)
        b0 = vfma(b0, vbroadcast(ld(X, k + 1)), x0)
        c0 = vfma(c0, vbroadcast(ld(X, k + 2)), x0)
        e0 = vfma(e0, vbroadcast(ld(X, k + 3)), x0)
    sc = vbroadcast(scale)
    vstore(S, so, vfma(vbroadcast(kb0), a0, sc))
    vstore(S, so + Lq, vfma(vbroadcast(kb1), b0, sc))
    vstore(S, so + 2 * Lq, vfma(vbroadcast(kb2), c0, sc))
    vstore(S, so + 3 * Lq, vfma(vbroadcast(kb3), e0, sc))


@njit(**_INLINE)
def _key_bias(bias, bo, has_bias, j, Tk):
    """The additive score of key ``j``: the mask's, or 0; pad keys (``j >= Tk``) are never read."""
    if j >= Tk:
        return NEG
    return ld(bias, bo + j) if has_bias else 0.0


@njit(**_INLINE)
def _lane_fix(tmp, m_off, t_off, inv, i0):
    """Per lane of a 16-query vector, from its score maximum (``tmp[m_off:]``) and exp sum
    (``tmp[t_off:]``): ``inv[i0 + l]`` = 1 / sum, or 0 where every key was masked."""
    for l in range(16):
        inv[i0 + l] = 0.0 if tmp[m_off + l] <= 0.5 * NEG else 1.0 / tmp[t_off + l]


@njit(**_INLINE)
def _tile_softmax(S, so, Lq, Tk, v0, tmp, inv):
    """exp(score - max over keys) in place down the ``Tk`` key rows of the 16 query lanes at
    column ``v0`` of the scores block; ``inv[v0:v0 + 16]`` = each query's 1 / sum (0 for a query
    whose every key is masked)."""
    m = vload(S, so + v0)
    for j in range(1, Tk):
        m = vmax(m, vload(S, so + j * Lq + v0))
    vstore(tmp, 0, m)
    for l in range(16):
        tmp[16 + l] = 0.0 if tmp[l] <= 0.5 * NEG else -tmp[l]
    sh = vload(tmp, 16)
    t = vbroadcast(0.0)
    for j in range(Tk):
        e = vexp(vadd(vload(S, so + j * Lq + v0), sh))
        vstore(S, so + j * Lq + v0, e)
        t = vadd(t, e)
    vstore(tmp, 32, t)
    _lane_fix(tmp, 0, 32, inv, v0)


@njit(**_INLINE)
def _tile_softmax4(S, so, Lq, Tk, tmp, inv):
    """:func:`_tile_softmax` for the 64 query lanes of a full tile, as four independent chains."""
    m0, m1, m2, m3 = vload(S, so), vload(S, so + 16), vload(S, so + 32), vload(S, so + 48)
    for j in range(1, Tk):
        s = so + j * Lq
        m0, m1 = vmax(m0, vload(S, s)), vmax(m1, vload(S, s + 16))
        m2, m3 = vmax(m2, vload(S, s + 32)), vmax(m3, vload(S, s + 48))
    vstore(tmp, 0, m0)
    vstore(tmp, 16, m1)
    vstore(tmp, 32, m2)
    vstore(tmp, 48, m3)
    for l in range(64):
        tmp[64 + l] = 0.0 if tmp[l] <= 0.5 * NEG else -tmp[l]
    n0, n1, n2, n3 = vload(tmp, 64), vload(tmp, 80), vload(tmp, 96), vload(tmp, 112)
    z = vbroadcast(0.0)
    t0, t1, t2, t3 = z, z, z, z
    for j in range(Tk):
        s = so + j * Lq
        e0, e1 = vexp(vadd(vload(S, s), n0)), vexp(vadd(vload(S, s + 16), n1))
        e2, e3 = vexp(vadd(vload(S, s + 32), n2)), vexp(vadd(vload(S, s + 48), n3))
        vstore(S, s, e0)
        vstore(S, s + 16, e1)
        vstore(S, s + 32, e2)
        vstore(S, s + 48, e3)
        t0, t1, t2, t3 = vadd(t0, e0), vadd(t1, e1), vadd(t2, e2), vadd(t3, e3)
    vstore(tmp, 64, t0)
    vstore(tmp, 80, t1)
    vstore(tmp, 96, t2)
    vstore(tmp, 112, t3)
    for v in range(4):
        _lane_fix(tmp, 16 * v, 64 + 16 * v, inv, 16 * v)


@njit(**_INLINE)
def _store_row(Y, o, x0, x1, x2, x3, m0, m1, m2, m3):
    """Y[o:o + 64] = the four vectors x times m (lane-wise)."""
    vstore(Y, o, vmul(x0, m0))
    vstore(Y, o + 16, vmul(x1, m1))
    vstore(Y, o + 32, vmul(x2, m2))
    vstore(Y, o + 48, vmul(x3, m3))


@njit(**_INLINE)
def _tile_values4(X, vbase, Tpad_row, O, T, Lq, S, so, D, d0, out, oo, inv):
    """Rows ``d0 .. d0 + 3`` of the head's output for 64 queries: sum over the ``T`` keys of
    P[j] x V[d][j] (values at channel ``vbase`` of each key tile), times each query's ``inv``."""
    z = vbroadcast(0.0)
    a0, a1, a2, a3, b0, b1, b2, b3 = z, z, z, z, z, z, z, z
    c0, c1, c2, c3, e0, e1, e2, e3 = z, z, z, z, z, z, z, z
    t0 = 0
    while t0 < T:
        Lk = tile_width(T, t0)
        vo = O * (Tpad_row + t0) + (vbase + d0) * Lk
        for jj in range(min(Lk, T - t0)):
            s = so + (t0 + jj) * Lq
            p0, p1, p2, p3 = vload(S, s), vload(S, s + 16), vload(S, s + 32), vload(S, s + 48)
            w = vbroadcast(ld(X, vo + jj))
            a0, a1, a2, a3 = vfma(a0, w, p0), vfma(a1, w, p1), vfma(a2, w, p2), vfma(a3, w, p3)
            w = vbroadcast(ld(X, vo + Lk + jj))
            b0, b1, b2, b3 = vfma(b0, w, p0), vfma(b1, w, p1), vfma(b2, w, p2), vfma(b3, w, p3)
            w = vbroadcast(ld(X, vo + 2 * Lk + jj))
            c0, c1, c2, c3 = vfma(c0, w, p0), vfma(c1, w, p1), vfma(c2, w, p2), vfma(c3, w, p3)
            w = vbroadcast(ld(X, vo + 3 * Lk + jj))
            e0, e1, e2, e3 = vfma(e0, w, p0), vfma(e1, w, p1), vfma(e2, w, p2), vfma(e3, w, p3)
        t0 += Lk
    i0, i1, i2, i3 = vload(inv, 0), vload(inv, 16), vload(inv, 32), vload(inv, 48)
    o = oo + d0 * Lq
    _store_row(out, o, a0, a1, a2, a3, i0, i1, i2, i3)
    _store_row(out, o + Lq, b0, b1, b2, b3, i0, i1, i2, i3)
    _store_row(out, o + 2 * Lq, c0, c1, c2, c3, i0, i1, i2, i3)
    _store_row(out, o + 3 * Lq, e0, e1, e2, e3, i0, i1, i2, i3)


@njit(**_INLINE)
def _tile_values1(X, vbase, Tpad_row, O, T, Lq, S, so, D, d0, v0, out, oo, inv):
    """:func:`_tile_values4` for the 16 queries at column ``v0``."""
    z = vbroadcast(0.0)
    a0, b0, c0, e0 = z, z, z, z
    t0 = 0
    while t0 < T:
        Lk = tile_width(T, t0)
        vo = O * (Tpad_row + t0) + (vbase + d0) * Lk
        for jj in range(min(Lk, T - t0)):
            p = vload(S, so + (t0 + jj) * Lq + v0)
            a0 = vfma(a0, vbroadcast(ld(X, vo + jj)), p)
            b0 = vfma(b0, vbroadcast(ld(X, vo + Lk + jj)), p)
            c0 = vfma(c0, vbroadcast(ld(X, vo + 2 * Lk + jj)), p)
            e0 = vfma(e0, vbroadcast(ld(X, vo + 3 * Lk + jj)), p)
        t0 += Lk
    iv = vload(inv, v0)
    o = oo + d0 * Lq + v0
    vstore(out, o, vmul(a0, iv))
    vstore(out, o + Lq, vmul(b0, iv))
    vstore(out, o + 2 * Lq, vmul(c0, iv))
    vstore(out, o + 3 * Lq, vmul(e0, iv))


@njit(**_JIT)
def _tile_unit(X, O, W, T, Tpad, b, h, t0q, D, scale, bias, bo, has_bias, S, tmp, inv, out):
    """One (sequence ``b``, head ``h``, query tile at ``t0q``) of :func:`attention_tiles`."""
    Lq = tile_width(T, t0q)
    row = b * Tpad
    qo = O * (row + t0q) + h * D * Lq
    # scores, key-major: S[j * Lq + l] for every key of every key tile (pad keys too, never read)
    t0 = 0
    while t0 < T:
        Lk = tile_width(T, t0)
        kbase = O * (row + t0) + (W + h * D) * Lk
        for jj in range(0, Lk, 4):
            j = t0 + jj
            kb0 = _key_bias(bias, bo, has_bias, j, T)
            kb1 = _key_bias(bias, bo, has_bias, j + 1, T)
            kb2 = _key_bias(bias, bo, has_bias, j + 2, T)
            kb3 = _key_bias(bias, bo, has_bias, j + 3, T)
            if Lq == 64:
                _tile_scores4(X, qo, Lq, kbase + jj, Lk, D, S, j * Lq, scale, kb0, kb1, kb2, kb3)
            else:
                for v0 in range(0, Lq, 16):
                    _tile_scores1(X, qo + v0, Lq, kbase + jj, Lk, D, S, j * Lq + v0, scale, kb0, kb1, kb2, kb3)
        t0 += Lk
    if Lq == 64:
        _tile_softmax4(S, 0, Lq, T, tmp, inv)
    else:
        for v0 in range(0, Lq, 16):
            _tile_softmax(S, 0, Lq, T, v0, tmp, inv)
    oo = W * (row + t0q) + h * D * Lq
    for d0 in range(0, D, 4):
        if Lq == 64:
            _tile_values4(X, 2 * W + h * D, row, O, T, Lq, S, 0, D, d0, out, oo, inv)
        else:
            for v0 in range(0, Lq, 16):
                _tile_values1(X, 2 * W + h * D, row, O, T, Lq, S, 0, D, d0, v0, out, oo, inv)


@njit(parallel=True, **_JIT)
def attention_tiles(X, B, T, Tpad, H, D, scale, bias, bstride, has_bias, work, out, nthreads):
    """``out`` = softmax(Q K^T * scale + bias) V for every sequence and head, on the tile layout.

    ``X``: the fused query, key and value projections in the tile layout ([3 H D, Lt] per
    tile: the queries' ``H * D`` channels, then the keys', then the values'), ``B`` sequences of
    ``T`` tokens, each padded to ``Tpad`` (:func:`spdy.kernels._spmm.padded_tokens`). ``out``: the
    heads side by side, [H D, Lt] per tile. ``bias``: each key's additive score (``NEG`` where
    masked) at ``b * bstride + j`` when ``has_bias``; the mask is the same for every query.
    ``D`` a multiple of 4. ``work``: scratch of ``nthreads * (Tpad + 3) * 64`` floats, 64-byte
    aligned. Threads take contiguous runs of (sequence, head, query tile) units; a query whose
    every key is masked gets zeros.
    """
    W = H * D
    O = 3 * W
    tiles = (T + 63) // 64
    units = B * H * tiles
    per = (Tpad + 3) * 64
    for c in prange(nthreads):
        u0 = c * units // nthreads
        u1 = (c + 1) * units // nthreads
        base = c * per
        S = work[base:base + Tpad * 64]
        tmp = work[base + Tpad * 64:base + (Tpad + 2) * 64]
        inv = work[base + (Tpad + 2) * 64:base + per]
        for u in range(u0, u1):
            b = u // (H * tiles)
            r = u - b * H * tiles
            h = r // tiles
            t0q = (r - h * tiles) * 64
            _tile_unit(X, O, W, T, Tpad, b, h, t0q, D, scale, bias, b * bstride, has_bias, S, tmp, inv, out)

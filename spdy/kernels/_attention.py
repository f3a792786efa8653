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

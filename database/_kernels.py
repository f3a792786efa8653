"""Numba kernels of the reconstruction methods.

``sweep_block``: the OBS column sweep inside one block of columns (SparseGPT Algorithm 1, lines 6-12).
``sweep_block_nm``: the same sweep choosing an N:M mask on the fly, group by group (SparseGPT's
``prunen``/``prunem`` branch).

Layout is transposed: ``W1[i, r]`` is column ``i`` of the block for stacked row
``r`` (rows of every level side by side), so the update of column ``j`` for a
chunk of rows is one contiguous, vectorisable loop. Rows are independent; chunks
of ``_CHUNK`` rows (a ``128 x 512`` float32 block = 256 KiB, inside L2) run in
parallel.
"""

from __future__ import annotations

import numba
import numpy as np

_CHUNK = 512


@numba.njit(parallel=True, cache=True, boundscheck=False, nogil=True, fastmath={"contract"})
def sweep_block(W1: np.ndarray, P1: np.ndarray, U1: np.ndarray, E1: np.ndarray, loss: np.ndarray) -> None:  # pragma: no cover - jitted
    """In place, for every stacked row r and column i = 0..n-1 of the block:

        E1[i, r] = W1[i, r] / U1[i, i]  if P1[i, r] (pruned) else 0      (the OBS error, eq. 3)
        W1[i, r] = 0                    if P1[i, r]
        W1[j, r] -= U1[i, j] * E1[i, r]  for j > i                        (the OBS update)
        loss[r] += E1[i, r]^2                                            (the OBS loss increment)

    ``W1``, ``E1``: float32 [n, R]; ``P1``: bool [n, R]; ``U1``: float32 [n, n] upper
    Cholesky factor of the (damped) inverse Hessian restricted to the block; ``loss``:
    float64 [R], accumulated (the sum over all blocks is ``D H_damped D^T`` of the row).
    """
    n, R = W1.shape
    n_chunks = (R + _CHUNK - 1) // _CHUNK
    for c in numba.prange(n_chunks):
        r0 = c * _CHUNK
        m = min(R, r0 + _CHUNK) - r0
        # Work on a private copy of the chunk: LLVM then knows nothing aliases it and
        # vectorises the update loop (5x faster than updating W1 in place).
        Wc = np.empty((n, _CHUNK), dtype=np.float32)
        e = np.empty(_CHUNK, dtype=np.float32)
        for i in range(n):
            for k in range(m):
                Wc[i, k] = W1[i, r0 + k]
        for i in range(n):
            d = U1[i, i]
            for k in range(m):
                if P1[i, r0 + k]:
                    v = Wc[i, k] / d
                    e[k] = v
                    Wc[i, k] = 0.0
                    loss[r0 + k] += np.float64(v) * np.float64(v)
                else:
                    e[k] = 0.0
            for k in range(m):
                E1[i, r0 + k] = e[k]
            for j in range(i + 1, n):
                u = U1[i, j]
                for k in range(m):
                    Wc[j, k] -= u * e[k]
        for i in range(n):
            for k in range(m):
                W1[i, r0 + k] = Wc[i, k]


@numba.njit(parallel=True, cache=True, boundscheck=False, nogil=True, fastmath={"contract"})
def sweep_block_nm(
    W1: np.ndarray, P1: np.ndarray, U1: np.ndarray, E1: np.ndarray, loss: np.ndarray, n_keep: int, m: int,
    dead1: np.ndarray,
) -> None:  # pragma: no cover - jitted
    """:func:`sweep_block` with the N:M mask chosen inside the sweep (SparseGPT, N:M variant).

    At the first column ``i`` of every group of ``m`` columns (``i % m == 0``; the block
    starts on a group boundary), each stacked row prunes the ``m - n_keep`` columns of
    the group with the smallest OBS saliency ``W1[j, r]^2 / U1[j, j]^2`` of its *current*
    weights (already updated by the sweep over earlier columns), dead inputs
    (``dead1[j]``) first, ties to the lower column. ``P1`` (bool [n, R]) is written: the
    chosen mask. Then the columns are swept as in :func:`sweep_block`.
    """
    n, R = W1.shape
    n_chunks = (R + _CHUNK - 1) // _CHUNK
    n_prune = m - n_keep
    for c in numba.prange(n_chunks):
        r0 = c * _CHUNK
        mm = min(R, r0 + _CHUNK) - r0
        Wc = np.empty((n, _CHUNK), dtype=np.float32)
        e = np.empty(_CHUNK, dtype=np.float32)
        sal = np.empty(m, dtype=np.float32)
        order = np.empty(m, dtype=np.int64)
        for i in range(n):
            for k in range(mm):
                Wc[i, k] = W1[i, r0 + k]
        for i in range(n):
            if i % m == 0:
                for k in range(mm):
                    for j in range(m):
                        if dead1[i + j]:
                            sal[j] = -1.0
                        else:
                            dj = U1[i + j, i + j]
                            w = Wc[i + j, k]
                            sal[j] = (w * w) / (dj * dj)
                        order[j] = j
                    # insertion sort of the group by saliency (stable: ties keep column order)
                    for a in range(1, m):
                        oa = order[a]
                        sa = sal[oa]
                        b = a - 1
                        while b >= 0 and sal[order[b]] > sa:
                            order[b + 1] = order[b]
                            b -= 1
                        order[b + 1] = oa
                    for j in range(m):
                        P1[i + j, r0 + k] = False
                    for j in range(n_prune):
                        P1[i + order[j], r0 + k] = True
            d = U1[i, i]
            for k in range(mm):
                if P1[i, r0 + k]:
                    v = Wc[i, k] / d
                    e[k] = v
                    Wc[i, k] = 0.0
                    loss[r0 + k] += np.float64(v) * np.float64(v)
                else:
                    e[k] = 0.0
            for k in range(mm):
                E1[i, r0 + k] = e[k]
            for j in range(i + 1, n):
                u = U1[i, j]
                for k in range(mm):
                    Wc[j, k] -= u * e[k]
        for i in range(n):
            for k in range(mm):
                W1[i, r0 + k] = Wc[i, k]


@numba.njit(cache=True, boundscheck=False, nogil=True, fastmath={"reassoc", "contract"})
def _cholesky_of_submatrix(H: np.ndarray, K: np.ndarray, L: np.ndarray) -> bool:  # pragma: no cover - jitted
    """Lower Cholesky factor ``L`` of ``H[K, K]`` (Cholesky-Banachiewicz, row by row).

    Rows are computed four at a time against every finished row ``j``, so each ``L[j, :j]``
    loaded from cache serves four dot products (3x faster than one row at a time for
    ``k`` of a few hundred). Returns False if ``H[K, K]`` is not numerically positive definite.
    """
    k = K.shape[0]
    good = True
    i0 = 0
    while i0 < k:
        nb = min(4, k - i0)
        if nb == 4:
            a0, a1, a2, a3 = K[i0], K[i0 + 1], K[i0 + 2], K[i0 + 3]
            for j in range(i0):
                kj = K[j]
                s0, s1, s2, s3 = H[a0, kj], H[a1, kj], H[a2, kj], H[a3, kj]
                for m in range(j):
                    ljm = L[j, m]
                    s0 -= L[i0, m] * ljm
                    s1 -= L[i0 + 1, m] * ljm
                    s2 -= L[i0 + 2, m] * ljm
                    s3 -= L[i0 + 3, m] * ljm
                inv = 1.0 / L[j, j]
                L[i0, j] = s0 * inv
                L[i0 + 1, j] = s1 * inv
                L[i0 + 2, j] = s2 * inv
                L[i0 + 3, j] = s3 * inv
        # the rest: the 4x4 diagonal block, or whole rows of a last group of < 4 rows
        for i in range(i0, i0 + nb):
            hi = K[i]
            for j in range(i0 if nb == 4 else 0, i + 1):
                s = H[hi, K[j]]
                for m in range(j):
                    s -= L[i, m] * L[j, m]
                if i == j:
                    if not s > 0.0:
                        good = False
                        s = 1.0
                    L[i, i] = np.sqrt(s)
                else:
                    L[i, j] = s / L[j, j]
        i0 += nb
    return good


@numba.njit(parallel=True, cache=True, boundscheck=False, nogil=True, fastmath={"reassoc", "contract"})
def solve_kept_rows(
    H: np.ndarray,
    G: np.ndarray,
    cols: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    rows: np.ndarray,
    order: np.ndarray,
    out: np.ndarray,
    ok: np.ndarray,
) -> None:  # pragma: no cover - jitted
    """The exact refit, one small SPD system per stacked row: ``H[K, K] x = G[row, K]``.

    System ``t`` has kept columns ``K = cols[starts[t] : starts[t] + counts[t]]`` and the
    right-hand side row ``rows[t]`` of ``G``; ``x`` is written to ``out[t, K]``. Each
    system is factored straight from ``H`` (no gathered copy), then two triangular
    solves. Systems run in parallel in the given ``order`` (largest first balances the
    threads). ``ok[t]`` is False when ``H[K, K]`` is not numerically positive definite
    (``x`` is then garbage). One pass per system with no gathered copy is what makes this
    faster than LAPACK's batched ``potrf`` + ``potrs`` for many systems of size 50-1000.
    """
    for p in numba.prange(order.shape[0]):
        t = order[p]
        k = counts[t]
        s0 = starts[t]
        K = cols[s0 : s0 + k]
        L = np.empty((k, k))
        ok[t] = _cholesky_of_submatrix(H, K, L)
        g = G[rows[t]]
        y = np.empty(k)
        for i in range(k):
            s = g[K[i]]
            for m in range(i):
                s -= L[i, m] * y[m]
            y[i] = s / L[i, i]
        for i in range(k - 1, -1, -1):
            s = y[i]
            for m in range(i + 1, k):
                s -= L[m, i] * y[m]
            y[i] = s / L[i, i]
        for i in range(k):
            out[t, K[i]] = y[i]

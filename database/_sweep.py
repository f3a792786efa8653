"""Numba kernel: the OBS column sweep inside one block of columns (SparseGPT Algorithm 1, lines 6-12).

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

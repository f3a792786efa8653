"""Compact encodings of one pruned weight matrix, chosen per level by storage cost.

For a matrix of ``L`` elements (``rows x cols``), ``nnz = (1 - p) L`` kept values
of ``n = 32`` bits each cost:

* ``dense``:  ``L n`` bits.
* ``bitmap``: ``(1 - p) L n + L`` bits: ``packbits`` of the keep mask plus the kept
  values in row-major order. Best at moderate sparsity.
* ``csr``:    ``(1 - p) L n + (1 - p) L b + 32 (rows + 1)`` bits, with ``b = 16``
  (uint16 column indices) when ``cols <= 65536`` and 32 otherwise: row pointers,
  column indices and values. Best at high sparsity (above ``1 - 1/b``: 93.75 %
  with 16-bit indices).

The cheapest one wins (ties go to the simpler encoding). The keep mask is
explicit, so a kept weight that happens to be 0.0 stays "kept".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from spdy.errors import DatabaseError

ENCODINGS = ("dense", "bitmap", "csr")


def index_dtype(cols: int) -> np.dtype:
    return np.dtype(np.uint16) if cols <= 65536 else np.dtype(np.int32)


def storage_bits(encoding: str, rows: int, cols: int, nnz: int, value_bits: int = 32) -> int:
    """Storage cost in bits of one matrix in ``encoding`` (the formulas in the module doc)."""
    L = rows * cols
    if encoding == "dense":
        return L * value_bits
    if encoding == "bitmap":
        return nnz * value_bits + L
    if encoding == "csr":
        return nnz * value_bits + nnz * 8 * index_dtype(cols).itemsize + 32 * (rows + 1)
    raise ValueError(f"unknown encoding {encoding!r}")


def choose_encoding(rows: int, cols: int, nnz: int) -> str:
    """The cheapest encoding for a ``rows x cols`` matrix with ``nnz`` kept values."""
    costs = {e: storage_bits(e, rows, cols, nnz) for e in ENCODINGS}
    return min(ENCODINGS, key=lambda e: (costs[e], ENCODINGS.index(e)))


def encode(W: np.ndarray, keep: np.ndarray, prefix: str, encoding: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """Encode ``W`` (2-D float32) with keep mask ``keep``; tensors are named ``prefix + field``."""
    rows, cols = W.shape
    keep = np.ascontiguousarray(keep, dtype=bool)
    nnz = int(keep.sum())
    enc = encoding or choose_encoding(rows, cols, nnz)
    W = np.ascontiguousarray(W, dtype=np.float32)
    if enc == "dense":
        return enc, {prefix + "dense": W}
    values = np.ascontiguousarray(W[keep])
    if enc == "bitmap":
        return enc, {prefix + "bitmap": np.packbits(keep.reshape(-1)), prefix + "values": values}
    if enc == "csr":
        indptr = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(keep.sum(axis=1), out=indptr[1:])
        c_idx = np.nonzero(keep)[1]  # row-major: each row's columns, ascending
        return enc, {
            prefix + "indptr": indptr,
            prefix + "indices": c_idx.astype(index_dtype(cols)),
            prefix + "values": values,
        }
    raise ValueError(f"unknown encoding {enc!r}")


def decode(get: Callable[[str], np.ndarray], encoding: str, rows: int, cols: int, prefix: str, out: np.ndarray | None = None) -> np.ndarray:
    """Dense float32 ``rows x cols`` matrix from the tensors ``get(prefix + field)``.

    ``out`` (float32, ``rows * cols`` elements) is filled in place when given.
    Raises :class:`DatabaseError` when the stored arrays do not fit the shape.
    """
    L = rows * cols
    if out is None:
        out = np.empty(L, dtype=np.float32)
    flat = out.reshape(-1)
    try:
        if encoding == "dense":
            src = get(prefix + "dense")
            flat[:] = src.reshape(-1)
        elif encoding == "bitmap":
            keep = np.unpackbits(get(prefix + "bitmap"), count=L).view(bool)
            values = get(prefix + "values")
            flat[:] = 0.0
            flat[keep] = values
        elif encoding == "csr":
            indptr = get(prefix + "indptr").astype(np.int64)
            indices = get(prefix + "indices")
            values = get(prefix + "values")
            if indptr.shape != (rows + 1,) or indptr[0] != 0 or indptr[-1] != len(values) or len(indices) != len(values):
                raise DatabaseError(f"CSR arrays {prefix}* do not fit a {rows}x{cols} matrix")
            if len(indices) and int(indices.max()) >= cols:
                raise DatabaseError(f"CSR column index out of range in {prefix}indices")
            flat[:] = 0.0
            pos = np.repeat(np.arange(rows, dtype=np.int64) * cols, np.diff(indptr)) + indices
            flat[pos] = values
        else:
            raise DatabaseError(f"unknown encoding {encoding!r} for {prefix}*")
    except (ValueError, IndexError) as exc:  # wrong sizes in a damaged file
        raise DatabaseError(f"stored arrays {prefix}* do not decode to a {rows}x{cols} matrix: {exc}") from exc
    return out.reshape(rows, cols)

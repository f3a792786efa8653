"""Three sparse Linears that read one input (a self-attention's query, key and value) in one call.

``y = [x Wq^T + bq, x Wk^T + bk, x Wv^T + bv]``: each thread packs its token tiles of ``x`` once
and runs the three weights on the packed tile, writing one ``[tokens, q + k + v]`` output that the
attention kernel reads in place (:func:`spdy.kernels.attention.attention_qkv_unchecked`). One
dispatch and one packing of ``x`` instead of three (:func:`spdy.kernels._spmm.qkv_forward`).

:func:`fusable` says whether three prepared weights can run this way; :func:`qkv` runs them on
fp32 arrays.
"""

from __future__ import annotations

import numpy as np

from spdy.errors import InvalidInputError
from spdy.kernels import _spmm
from spdy.kernels._workspace import scratch
from spdy.kernels.ffn import fused_threads
from spdy.kernels.linear import PreparedLinear
from spdy.types import FUSED_FORMATS


def fusable(q: PreparedLinear, k: PreparedLinear, v: PreparedLinear) -> bool:
    """Whether ``q``, ``k`` and ``v`` can run as one call: each in a format of
    :data:`spdy.types.FUSED_FORMATS` (the multithreaded sparse ones), all reading the same width."""
    return all(type(p) is PreparedLinear and p.format in FUSED_FORMATS for p in (q, k, v)) and (
        q.in_features == k.in_features == v.in_features)


def qkv_into(x2: np.ndarray, y2: np.ndarray, q: PreparedLinear, k: PreparedLinear, v: PreparedLinear) -> None:
    """The three layers on arrays the caller has checked: ``x2`` [T, in] and ``y2`` [T, q + k + v
    out_features], fp32, C-contiguous, ``T >= 1``, ``fusable(q, k, v)``."""
    a, b, c = q.sparse, k.sparse, v.sparse
    assert a is not None and b is not None and c is not None
    T, K = x2.shape
    O = q.out_features + k.out_features + v.out_features
    n = fused_threads(T)
    tile = _spmm.TILE
    _spmm.qkv_forward(
        x2.reshape(-1), T, K, q.out_features, k.out_features, v.out_features,
        a.ptr, a.n_panels, a.col, a.val, a.blocked, q.bias, b.ptr, b.n_panels, b.col, b.val, b.blocked, k.bias,
        c.ptr, c.n_panels, c.col, c.val, c.blocked, v.bias,
        scratch(0, n * K * tile + 64), scratch(1, n * O * tile + 64), y2.reshape(-1), n,
    )


def qkv(x: np.ndarray, q: PreparedLinear, k: PreparedLinear, v: PreparedLinear) -> np.ndarray:
    """``[x Wq^T + bq, x Wk^T + bk, x Wv^T + bv]`` concatenated over the last axis, for fp32 ``x`` of
    shape ``[..., in_features]``; returns ``[..., q + k + v out_features]``."""
    if not fusable(q, k, v):
        raise InvalidInputError(
            "qkv needs three prepared Linears in multithreaded sparse formats (csr, bcsr1x4, bcsr4x1) that "
            "read the same width; got " + ", ".join(
                f"{getattr(p, 'format', type(p).__name__)} {getattr(p, 'out_features', '?')}x"
                f"{getattr(p, 'in_features', '?')}" for p in (q, k, v))
            + ": run them one at a time with spdy.kernels.linear")
    K = q.in_features
    a = np.asarray(x)
    if a.dtype != np.float32 or a.ndim < 1 or a.shape[-1] != K:
        raise InvalidInputError(f"qkv takes float32 input [..., {K}]; got {a.dtype} {a.shape}")
    x2 = np.ascontiguousarray(a.reshape(-1, K))
    O = q.out_features + k.out_features + v.out_features
    y2 = np.empty((x2.shape[0], O), np.float32)
    if x2.shape[0]:
        qkv_into(x2, y2, q, k, v)
    return y2.reshape(*a.shape[:-1], O)

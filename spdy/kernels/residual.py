"""A sparse Linear with the residual add and the LayerNorm after it in its epilogue.

``y = LayerNorm(x W^T + b + r)``: a transformer's attention output block (the output projection
of the attention, the residual from the block's input, the LayerNorm). Each thread packs its
token tiles of ``x`` and of the residual ``r``, and adds and normalises the tile while it is in
the thread's caches: one dispatch instead of three operators, and no pass of the sum through
memory between them (:func:`spdy.kernels._spmm.residual_forward`).

:func:`fusable` says whether a prepared weight can run this way; :func:`linear_residual` runs it
on fp32 arrays.
"""

from __future__ import annotations

import numpy as np

from spdy.errors import InvalidInputError
from spdy.kernels import _spmm
from spdy.kernels._workspace import scratch
from spdy.kernels.ffn import checked_norm, fused_threads, norm_args
from spdy.kernels.linear import PreparedLinear
from spdy.types import FUSED_FORMATS


def fusable(p: PreparedLinear) -> bool:
    """Whether ``p`` can run with the residual in its epilogue: a format of
    :data:`spdy.types.FUSED_FORMATS` (the multithreaded sparse ones)."""
    return type(p) is PreparedLinear and p.format in FUSED_FORMATS


def residual_into(x2: np.ndarray, r2: np.ndarray, y2: np.ndarray, p: PreparedLinear,
                  norm: tuple[np.ndarray, np.ndarray, float] | None = None) -> None:
    """The layer, residual and norm on arrays the caller has checked: ``x2`` [T, in], ``r2`` and
    ``y2`` [T, out], fp32, C-contiguous, ``T >= 1``, ``fusable(p)``. ``norm`` = (weight, bias,
    eps): a LayerNorm over the output's features after the residual (fp32 contiguous arrays of
    ``out`` values)."""
    s = p.sparse
    assert s is not None
    T, K = x2.shape
    O = p.out_features
    n = fused_threads(T)
    tile = _spmm.TILE
    _spmm.residual_forward(
        x2.reshape(-1), r2.reshape(-1), T, K, O, s.ptr, s.n_panels, s.col, s.val, s.blocked, p.bias,
        *norm_args(norm),
        scratch(0, n * K * tile + 64), scratch(2, n * O * tile + 64), scratch(1, n * O * tile + 64), y2.reshape(-1), n,
    )


def linear_residual(x: np.ndarray, r: np.ndarray, p: PreparedLinear,
                    norm: tuple[np.ndarray, np.ndarray, float] | None = None) -> np.ndarray:
    """``x W^T + b + r`` for fp32 ``x`` of shape ``[..., in_features]`` and ``r`` of shape
    ``[..., out_features]`` with the same leading dims; ``norm`` = (weight, bias, eps) applies a
    LayerNorm over the output features last."""
    if not fusable(p):
        raise InvalidInputError(
            "linear_residual needs a prepared Linear in a multithreaded sparse format (csr, bcsr1x4, bcsr4x1); "
            f"got {getattr(p, 'format', type(p).__name__)}: run it with spdy.kernels.linear and add the residual")
    K, O = p.in_features, p.out_features
    a, res = np.asarray(x), np.asarray(r)
    if a.dtype != np.float32 or a.ndim == 0 or a.shape[-1] != K:
        raise InvalidInputError(f"linear_residual takes fp32 activations [..., {K}]; got {a.dtype} of shape {a.shape}")
    if res.dtype != np.float32 or res.shape != (*a.shape[:-1], O):
        raise InvalidInputError(f"the residual must be fp32 of shape {(*a.shape[:-1], O)}; got {res.dtype} of "
                                f"shape {res.shape}")
    norm = checked_norm(norm, O)
    lead = a.shape[:-1]
    T = int(np.prod(lead)) if lead else 1
    y = np.empty((*lead, O), np.float32)
    if T:
        residual_into(np.ascontiguousarray(a).reshape(T, K), np.ascontiguousarray(res).reshape(T, O),
                      y.reshape(T, O), p, norm)
    return y

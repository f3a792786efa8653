"""A sparse Linear with the residual add and the LayerNorm after it in its epilogue.

``y = LayerNorm(x W^T + b + r)``: a transformer's attention output projection and what follows
it, in one call (:func:`spdy.kernels._spmm.linear_norm_forward`). Each thread packs its token
tiles of ``x`` and of the residual ``r`` into the kernels' [channels, tokens] layout, adds and
normalises there and writes each output tile once: no separate add or LayerNorm pass over the
output, one dispatch instead of three operators.

:func:`fusable` says whether a prepared weight can run this way (the formats of
:data:`spdy.types.FUSED_FORMATS`, as for :mod:`spdy.kernels.ffn`); :func:`linear_norm` runs it
on fp32 arrays.
"""

from __future__ import annotations

import numpy as np

from spdy.errors import InvalidInputError
from spdy.kernels import _spmm
from spdy.kernels._workspace import scratch
from spdy.kernels.ffn import fused_threads
from spdy.kernels.linear import PreparedLinear
from spdy.types import FUSED_FORMATS


def fusable(prepared: PreparedLinear) -> bool:
    """Whether ``prepared`` can run with the residual and LayerNorm epilogue: a format of
    :data:`spdy.types.FUSED_FORMATS` (the multithreaded sparse ones)."""
    return type(prepared) is PreparedLinear and prepared.format in FUSED_FORMATS


def linear_norm_into(x2: np.ndarray, r2: np.ndarray, y2: np.ndarray, prepared: PreparedLinear,
                     norm: tuple[np.ndarray, np.ndarray, float]) -> None:
    """The fused call on arrays the caller has checked: ``x2`` [T, in], ``r2`` and ``y2`` [T, out],
    fp32, C-contiguous, ``T >= 1``, ``fusable(prepared)``; ``norm`` = (weight, bias, eps) of the
    LayerNorm over the ``out`` features (fp32 contiguous arrays of ``out`` values)."""
    s = prepared.sparse
    assert s is not None
    T, K = x2.shape
    O = prepared.out_features
    n = fused_threads(T)
    tile = _spmm.TILE
    _spmm.linear_norm_forward(
        x2.reshape(-1), T, K, O, s.ptr, s.n_panels, s.col, s.val, s.blocked, prepared.bias, r2.reshape(-1),
        norm[0], norm[1], np.float32(norm[2]),
        scratch(0, n * K * tile + 64), scratch(2, n * O * tile + 64), scratch(1, n * O * tile + 64), y2.reshape(-1), n,
    )


def linear_norm(x: np.ndarray, residual: np.ndarray, prepared: PreparedLinear,
                norm: tuple[np.ndarray, np.ndarray, float]) -> np.ndarray:
    """``LayerNorm(x W^T + b + residual)`` for fp32 ``x`` of shape ``[..., in_features]`` and
    ``residual`` of shape ``[..., out_features]``; ``norm`` = (weight, bias, eps) of the LayerNorm
    over the output features. Returns ``[..., out_features]``."""
    if not fusable(prepared):
        raise InvalidInputError(
            "linear_norm needs a prepared Linear in a multithreaded sparse format (csr, bcsr1x4, bcsr4x1); got "
            f"{getattr(prepared, 'format', type(prepared).__name__)}: run spdy.kernels.linear, the add and the "
            "LayerNorm one after another")
    K, O = prepared.in_features, prepared.out_features
    a = np.asarray(x)
    if a.dtype != np.float32 or a.ndim == 0 or a.shape[-1] != K:
        raise InvalidInputError(f"linear_norm takes fp32 activations [..., {K}]; got {a.dtype} of shape {a.shape}")
    r = np.asarray(residual)
    if r.dtype != np.float32 or r.shape != (*a.shape[:-1], O):
        raise InvalidInputError(f"the residual must be fp32 of shape {(*a.shape[:-1], O)}; got {r.dtype} of shape "
                                f"{r.shape}")
    w, b, eps = norm
    norm = (np.ascontiguousarray(w, np.float32).reshape(-1), np.ascontiguousarray(b, np.float32).reshape(-1),
            float(eps))
    if norm[0].size != O or norm[1].size != O or not norm[2] > 0:
        raise InvalidInputError(f"norm needs {O} weights, {O} biases and eps > 0; got {norm[0].size}, "
                                f"{norm[1].size} and {norm[2]}")
    a, r = np.ascontiguousarray(a), np.ascontiguousarray(r)
    lead = a.shape[:-1]
    T = int(np.prod(lead)) if lead else 1
    y = np.empty((*lead, O), np.float32)
    if T:
        linear_norm_into(a.reshape(T, K), r.reshape(T, O), y.reshape(T, O), prepared, norm)
    return y

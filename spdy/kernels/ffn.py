"""A transformer's feed-forward block on two sparse Linears chained in the kernels' tile layout.

``y = LayerNorm(gelu(x W1^T + b1) W2^T + b2 (+ x))``: the up projection, exact GELU, the down
projection and (optionally) the residual and the LayerNorm after it, in one call. Each thread
packs its token tiles of ``x`` once, and the hidden activations stay in the [hidden, tokens]
tile layout that the second kernel reads, in the thread's own caches: no transposition out of the first layer
and back into the second, no separate GELU, residual or LayerNorm pass, one dispatch instead
of five operators (:func:`spdy.kernels._spmm.ffn_forward`).

:func:`fusable` says whether a pair of prepared weights can run this way; :func:`ffn` runs it
on fp32 arrays.
"""

from __future__ import annotations

import numba
import numpy as np

from spdy.errors import InvalidInputError
from spdy.kernels import _spmm
from spdy.kernels._workspace import scratch
from spdy.kernels.linear import PreparedLinear
from spdy.types import FUSED_FORMATS


def fusable(up: PreparedLinear, down: PreparedLinear) -> bool:
    """Whether ``up`` then ``down`` can run as one fused block: both in a format of
    :data:`spdy.types.FUSED_FORMATS` (the multithreaded sparse ones) and ``down`` reading what
    ``up`` writes."""
    return (type(up) is PreparedLinear and type(down) is PreparedLinear and up.format in FUSED_FORMATS
            and down.format in FUSED_FORMATS and down.in_features == up.out_features)


def fused_threads(tokens: int, nthreads: int | None = None) -> int:
    """Threads the fused block uses on ``tokens`` rows: one token tile each at most, since the
    hidden tile of one token tile is not split between threads."""
    n = numba.get_num_threads() if nthreads is None else nthreads
    return max(1, min(n, (tokens + _spmm.TILE - 1) // _spmm.TILE))


_NO_NORM = np.zeros(1, np.float32)


def checked_norm(norm: tuple[np.ndarray, np.ndarray, float] | None, width: int
                 ) -> tuple[np.ndarray, np.ndarray, float] | None:
    """A LayerNorm epilogue's (weight, bias, eps) as the kernels take it: fp32 contiguous arrays of
    ``width`` values and eps > 0; None stays None."""
    if norm is None:
        return None
    w, b, eps = norm
    out = (np.ascontiguousarray(w, np.float32).reshape(-1), np.ascontiguousarray(b, np.float32).reshape(-1), float(eps))
    if out[0].size != width or out[1].size != width or not out[2] > 0:
        raise InvalidInputError(f"norm needs {width} weights, {width} biases and eps > 0; got {out[0].size}, "
                                f"{out[1].size} and {out[2]}")
    return out


def norm_args(norm: tuple[np.ndarray, np.ndarray, float] | None) -> tuple[bool, np.ndarray, np.ndarray, np.float32]:
    """A LayerNorm epilogue (weight, bias, eps) or None as the kernels' ``norm, gamma, beta, eps`` arguments."""
    if norm is None:
        return False, _NO_NORM, _NO_NORM, np.float32(0.0)
    return True, norm[0], norm[1], np.float32(norm[2])


def ffn_into(x2: np.ndarray, y2: np.ndarray, up: PreparedLinear, down: PreparedLinear, residual: bool,
             norm: tuple[np.ndarray, np.ndarray, float] | None = None) -> None:
    """The fused block on arrays the caller has checked: ``x2`` [T, in] and ``y2`` [T, out], fp32,
    C-contiguous, ``T >= 1``, ``fusable(up, down)``, and ``out == in`` when ``residual``.
    ``norm`` = (weight, bias, eps): a LayerNorm over the output's features after the residual
    (fp32 contiguous arrays of ``out`` values)."""
    a, b = up.sparse, down.sparse
    assert a is not None and b is not None
    T, K = x2.shape
    M, O = up.out_features, down.out_features
    n = fused_threads(T)
    tile = _spmm.TILE
    _spmm.ffn_forward(
        x2.reshape(-1), T, K, M, O, a.ptr, a.n_panels, a.col, a.val, a.blocked, up.bias,
        b.ptr, b.n_panels, b.col, b.val, b.blocked, down.bias, residual, *norm_args(norm),
        scratch(0, n * K * tile + 64), scratch(2, n * M * tile + 64), scratch(1, n * O * tile + 64), y2.reshape(-1), n,
    )


def ffn(x: np.ndarray, up: PreparedLinear, down: PreparedLinear, residual: bool = False,
        norm: tuple[np.ndarray, np.ndarray, float] | None = None) -> np.ndarray:
    """``gelu(x W1^T + b1) W2^T + b2``, plus ``x`` when ``residual``, for fp32 ``x`` of shape
    ``[..., up.in_features]``; returns ``[..., down.out_features]`` (exact GELU, the erf form).
    ``norm`` = (weight, bias, eps) applies a LayerNorm over the output features last."""
    if not fusable(up, down):
        raise InvalidInputError(
            "ffn needs two prepared Linears in multithreaded sparse formats (csr, bcsr1x4, bcsr4x1) whose "
            f"shapes chain; got {getattr(up, 'format', type(up).__name__)} "
            f"{getattr(up, 'out_features', '?')}x{getattr(up, 'in_features', '?')} then "
            f"{getattr(down, 'format', type(down).__name__)} {getattr(down, 'out_features', '?')}x"
            f"{getattr(down, 'in_features', '?')}: run them one at a time with spdy.kernels.linear")
    K, O = up.in_features, down.out_features
    if residual and O != K:
        raise InvalidInputError(f"a residual needs the block's output width ({O}) to equal its input width ({K})")
    a = np.asarray(x)
    if a.dtype != np.float32 or a.ndim == 0 or a.shape[-1] != K:
        raise InvalidInputError(f"ffn takes fp32 activations [..., {K}]; got {a.dtype} of shape {a.shape}")
    norm = checked_norm(norm, O)
    a = np.ascontiguousarray(a)
    lead = a.shape[:-1]
    T = int(np.prod(lead)) if lead else 1
    y = np.empty((*lead, O), np.float32)
    if T:
        ffn_into(a.reshape(T, K), y.reshape(T, O), up, down, residual, norm)
    return y

"""Linear layers on prepared weights: ``y = x W^T + b`` in one of several formats.

Formats (:data:`FORMATS`):

``dense``
    torch's dense GEMM (MKL) on the fp32 weight, exactly what an unpruned
    ``nn.Linear`` runs.
``csr``
    unstructured panel-CSR on the Numba kernels of :mod:`spdy.kernels._spmm`.
``bcsr1x4``
    blocked 1x4: aligned groups of 4 consecutive input weights of one output
    row are stored (and multiplied) together, one index per group. Exact for
    any weight (groups with some zeros store explicit zeros); fast only when
    the pruning mask itself is 1x4-blocked. Measured 1.0-1.1x faster than
    ``csr`` at the same sparsity.
``bcsr4x1``
    blocked 4x1: aligned groups of 4 consecutive output rows that share an
    input column, stored together (one index, four weights). Each activation
    vector loaded feeds four rows, so it is 1.6-2x faster than ``csr`` per
    nonzero (measured); exact for any weight, fast when the mask is 4x1-blocked.
    Needs ``out_features % 4 == 0``.
``dnnl``
    dense, in oneDNN's own blocked weight layout, packed once at load time
    (torch's ``mkldnn._linear_pointwise``, as Inductor's weight prepacking
    runs it). Measured on the 2-core Zen 5 machines, 128 tokens, the MiniLM
    shapes: 10-13% faster than torch's ``nn.Linear`` on one thread, 20-23% on
    two. Only where torch was built with oneDNN (:data:`DNNL`).
``csr-1t``, ``bcsr1x4-1t``, ``bcsr4x1-1t``
    the same kernels on the calling thread alone, whatever the thread count:
    no OpenMP region to fork and join. A short kernel (tens of microseconds) on
    two threads waits for both at every call; on a loaded machine that wait is
    what it loses most, and a serial call loses only its own share of the CPU.

Prepare a weight once at load time (:func:`prepare_linear`), then call the
result (or :func:`linear`) on activations of shape ``[..., in_features]``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
import torch

from spdy.errors import InvalidInputError
from spdy.kernels import _spmm
from spdy.kernels._checks import as_activations, as_bias, as_weight, check_out
from spdy.kernels._workspace import scratch

log = logging.getLogger(__name__)

SERIAL = "-1t"
"""Suffix of a sparse format that runs on the calling thread alone (e.g. ``csr-1t``)."""

def _dnnl_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


DNNL: bool = _dnnl_available()
"""Whether torch has oneDNN here, and with it the ``dnnl`` format."""

DNNL_TOKENS = 128
"""Rows per call the ``dnnl`` weight is packed for when the caller does not say (any count runs)."""

FORMATS: tuple[str, ...] = ("dense", "csr", "bcsr1x4", "bcsr4x1", "csr-1t", "bcsr1x4-1t", "bcsr4x1-1t") + (
    ("dnnl",) if DNNL else ())
"""Every weight format the kernels implement here (``"auto"`` picks ``dense`` or a sparse one)."""


def is_serial(format: str) -> bool:
    """True for the formats that run on the calling thread alone (:data:`SERIAL`)."""
    return format.endswith(SERIAL)

PANEL_MIN, PANEL_MAX, PANEL_NNZ = 128, 768, 20
"""Panel width rule (see :func:`panel_width`)."""

ROW_OVERHEAD = 4
"""Per-row cost, in nonzeros, used to balance threads (bias, stores, transposition)."""



@dataclass(frozen=True, eq=False)
class SparsePayload:
    """Kernel-ready arrays of a ``csr``/``bcsr1x4``/``bcsr4x1`` weight (see :mod:`spdy.kernels._spmm`)."""

    ptr: np.ndarray  # int32 [n_panels * rows + 1]; rows = O, or O // 4 row groups (bcsr4x1)
    col: np.ndarray  # uint16 or int32 [entries]: column (csr, bcsr4x1) or column // 4 (bcsr1x4)
    val: np.ndarray  # float32 [entries] (csr) or [4 * entries] (blocked)
    row_cost: np.ndarray  # int64 [O + 1], cumulative work per row
    n_panels: int
    blocked: int  # 0 = csr, 1 = bcsr1x4, 2 = bcsr4x1


@dataclass(frozen=True, eq=False)
class PreparedLinear:
    """A Linear weight prepared once for fast inference; call it on activations.

    Attributes: ``format`` (one of :data:`FORMATS`), ``out_features``,
    ``in_features``, ``nnz`` (nonzero weights of the original), ``stored``
    (weights the format multiplies, explicit zeros of blocks included),
    ``bias`` (fp32 [out], zeros when the layer had none), ``has_bias`` and
    ``serial`` (the kernel runs on the calling thread alone: a ``-1t`` format).
    """

    format: str
    out_features: int
    in_features: int
    nnz: int
    stored: int
    bias: np.ndarray
    has_bias: bool
    dense: np.ndarray | None = field(default=None, repr=False)
    sparse: SparsePayload | None = field(default=None, repr=False)

    @property
    def serial(self) -> bool:
        return is_serial(self.format)

    def dnnl_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight packed in oneDNN's layout (the ``dnnl`` format) and the bias as a tensor,
        made at first use and kept; copies and pickles pack again rather than carry them."""
        got = self.__dict__.get("_dnnl")
        if got is None:
            if self.dense is None:
                raise InvalidInputError(f"a {self.format!r} weight has no dense copy to pack for oneDNN")
            tokens = int(self.__dict__.get("_dnnl_tokens") or DNNL_TOKENS)
            got = (torch.ops.mkldnn._reorder_linear_weight(torch.from_numpy(self.dense), tokens),
                   torch.from_numpy(self.bias) if self.has_bias else None)
            object.__setattr__(self, "_dnnl", got)
        return got

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_dnnl", None)
        return state

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights in the original matrix."""
        total = self.out_features * self.in_features
        return 1.0 - self.nnz / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes held by the prepared weight."""
        n = self.bias.nbytes
        if self.dense is not None:
            n += self.dense.nbytes
        if self.sparse is not None:
            n += self.sparse.ptr.nbytes + self.sparse.col.nbytes + self.sparse.val.nbytes + self.sparse.row_cost.nbytes
        return n

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return linear(x, self, out=out)

    def to_dense(self) -> np.ndarray:
        """The [out, in] fp32 weight this object multiplies by (for checks)."""
        if self.dense is not None:
            return self.dense.copy()
        assert self.sparse is not None
        s = self.sparse
        O, K = self.out_features, self.in_features
        W = np.zeros((O, K + 3), np.float32)
        n_rows = O // 4 if s.blocked == 2 else O
        rows = np.repeat(np.tile(np.arange(n_rows), s.n_panels), np.diff(s.ptr.astype(np.int64)))
        if s.blocked == 1:
            cols = s.col.astype(np.int64)[:, None] * 4 + np.arange(4)
            W[rows[:, None], cols] = s.val.reshape(-1, 4)
        elif s.blocked == 2:
            W[rows[:, None] * 4 + np.arange(4), s.col.astype(np.int64)[:, None]] = s.val.reshape(-1, 4)
        else:
            W[rows, s.col.astype(np.int64)] = s.val
        return W[:, :K].copy()


def dnnl_linear(x: torch.Tensor, prepared: PreparedLinear) -> torch.Tensor:
    """``x W^T + b`` of a ``dnnl`` weight on a float32 torch tensor ``[..., in_features]`` (a new tensor)."""
    packed, bias = prepared.dnnl_weight()
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def token_waste(tokens: int | None) -> float:
    """Multiply-adds the sparse kernels do per useful one: tokens are processed in
    vectors of 16, so ``tokens`` is rounded up to 16 (1.0 when unknown)."""
    if tokens is None or tokens <= 0:
        return 1.0
    return _spmm.padded_tokens_py(int(tokens)) / tokens


def choose_format(weight: np.ndarray, tokens: int | None = None) -> str:
    """The format ``auto`` uses for this [out, in] weight: deterministic, O(size), no timing.

    ``csr`` when it does fewer multiply-adds than a dense GEMM,
    ``(1 - sparsity) * token_waste(tokens) < 1``, else ``dense``. ``tokens``
    is the number of rows of ``x`` per call (batch x sequence), if known; when
    it is None it is assumed to be large (no rounding waste), so any sparsity
    above 0 picks ``csr``. The rule is conservative: measured on the 2-core
    Zen 5 machines (``scripts/bench_kernels.py``), ``csr`` is 1.2-1.3x faster
    than torch's dense GEMM even at 0% sparsity for 128-512 tokens, 1.5-1.6x at
    20%, 2-3x at 40%; at 1 token it needs >= 94% sparsity, at 8 tokens >= 50%.
    A blocked format replaces ``csr`` when the nonzeros already come in its
    aligned groups of four (no explicit zeros): ``bcsr4x1`` (4 output rows,
    1.6-2x faster) first, then ``bcsr1x4`` (4 inputs, ~1.05x).
    """
    w = np.asarray(weight)
    total = w.size
    if w.ndim != 2 or total == 0:
        return "dense"
    nnz = int(np.count_nonzero(w))
    density = nnz / total
    if density * token_waste(tokens) >= 1.0:
        return "dense"
    if nnz > 0:
        O, K = w.shape
        nz = w != 0
        if O % 4 == 0 and 4 * np.count_nonzero(nz.reshape(O // 4, 4, K).any(axis=1)) == nnz:
            return "bcsr4x1"
        if K % 4 == 0 and 4 * np.count_nonzero(nz.reshape(O, K // 4, 4).any(axis=2)) == nnz:
            return "bcsr1x4"
    return "csr"


def panel_width(density: float, in_features: int) -> int:
    """Input columns per panel for a weight with this fraction of nonzeros.

    A panel of 128 columns x 64 tokens x 4 bytes = 32 KiB of activations stays
    in L1 while every output row sweeps over it, but each (row, panel) pair
    costs a load and store of the row's accumulators. Measured optimum (1
    thread, 128 tokens, 384/1536-wide layers): about 20 nonzeros per row and
    panel, i.e. 128 columns up to 80% sparsity, 192-256 at 90%, 384 at 95%,
    768 at 98%.
    """
    if density <= 0:
        return max(1, in_features)
    p = int(round(PANEL_NNZ / density / 64.0)) * 64
    return max(1, min(max(PANEL_MIN, min(p, PANEL_MAX)), in_features))


def _panel_csr(W: np.ndarray, blocked: int, panel: int) -> SparsePayload:
    """Group the nonzeros by (panel, row or row group, column); ``blocked`` as in SparsePayload."""
    O, K = W.shape
    n_rows = O
    if blocked == 1:
        if K % 4:
            raise InvalidInputError(
                f"format 'bcsr1x4' needs in_features divisible by 4; got {K}. Use format='csr' or 'auto'."
            )
        groups = W.reshape(O, K // 4, 4)
        rows, cols = np.nonzero(groups.any(axis=2))
        vals = groups[rows, cols].reshape(-1)
        per = 4
        col_of_entry = cols * 4
    elif blocked == 2:
        if O % 4:
            raise InvalidInputError(
                f"format 'bcsr4x1' needs out_features divisible by 4; got {O}. Use format='csr' or 'auto'."
            )
        n_rows = O // 4
        groups = W.reshape(n_rows, 4, K)
        rows, cols = np.nonzero(groups.any(axis=1))
        vals = groups[rows, :, cols].reshape(-1)
        per = 4
        col_of_entry = cols
    else:
        rows, cols = np.nonzero(W)
        vals = W[rows, cols]
        per = 1
        col_of_entry = cols
    n_panels = max(1, -(-K // panel))
    pan = col_of_entry // panel
    order = np.lexsort((cols, rows, pan))
    rows, cols, pan = rows[order], cols[order], pan[order]
    vals = vals.reshape(-1, per)[order].reshape(-1)
    counts = np.bincount(pan * n_rows + rows, minlength=n_panels * n_rows)
    ptr = np.zeros(n_panels * n_rows + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    if ptr[-1] >= 2**31:
        raise InvalidInputError(f"{ptr[-1]} nonzeros exceed the kernels' int32 index range; split the layer")
    col_dtype = np.uint16 if K <= 65536 else np.int32
    if blocked == 2:  # each entry costs its group's 4 rows one FMA each
        row_nnz = np.repeat(np.bincount(rows, minlength=n_rows), 4)
    else:
        row_nnz = np.bincount(rows, minlength=O) * per
    row_cost = np.zeros(O + 1, np.int64)
    np.cumsum(row_nnz + ROW_OVERHEAD, out=row_cost[1:])
    return SparsePayload(
        ptr=ptr.astype(np.int32),
        col=np.ascontiguousarray(cols, dtype=col_dtype),
        val=np.ascontiguousarray(vals, dtype=np.float32),
        row_cost=row_cost,
        n_panels=int(n_panels),
        blocked=int(blocked),
    )


def prepare_linear(
    weight: Any, bias: Any = None, format: str = "auto", panel: int | None = None, tokens: int | None = None
) -> PreparedLinear:
    """Prepare a dense fp32 [out, in] weight (zeros = pruned) once, at load time.

    ``format`` is ``"auto"`` (see :func:`choose_format`, which ``tokens``,
    the expected rows per call, informs) or one of :data:`FORMATS`. ``weight`` and ``bias`` may be numpy arrays or torch
    tensors; they are copied. ``panel`` overrides :func:`panel_width`.
    """
    W = as_weight(weight, 2)
    O, K = W.shape
    b, has_bias = as_bias(bias, O)
    if format == "auto":
        format = choose_format(W, tokens)
    if format not in FORMATS:
        raise InvalidInputError(f"unknown format {format!r}; expected 'auto' or one of {FORMATS}")
    nnz = int(np.count_nonzero(W))
    if panel is None:
        panel = panel_width(nnz / W.size if W.size else 0.0, K)
    if isinstance(panel, bool) or not isinstance(panel, int) or panel < 1:
        raise InvalidInputError(f"panel must be a positive int; got {panel!r}")
    if format == "dense":
        return PreparedLinear("dense", O, K, nnz, O * K, b, has_bias, dense=W)
    if format == "dnnl":
        p = PreparedLinear("dnnl", O, K, nnz, O * K, b, has_bias, dense=W)
        object.__setattr__(p, "_dnnl_tokens", tokens)
        p.dnnl_weight()  # pack now, at load time
        return p
    payload = _panel_csr(W, blocked={"csr": 0, "bcsr1x4": 1, "bcsr4x1": 2}[format.removesuffix(SERIAL)], panel=panel)
    return PreparedLinear(format, O, K, nnz, int(payload.val.size), b, has_bias, sparse=payload)


def linear(x: np.ndarray, prepared: PreparedLinear, out: np.ndarray | None = None) -> np.ndarray:
    """``x W^T + b`` for fp32 ``x`` of shape ``[..., in_features]``; returns ``[..., out_features]``.

    ``out`` (optional) receives the result; it must be a C-contiguous fp32
    array of the output shape. Runs on the calling thread's thread count
    (:func:`spdy.kernels.set_num_threads`).
    """
    if type(prepared) is not PreparedLinear:
        raise InvalidInputError(f"prepared must come from prepare_linear(); got {type(prepared).__name__}")
    K, O = prepared.in_features, prepared.out_features
    # fast path first: the common call is already fp32, C-contiguous, right width
    if not (type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim and x.shape[-1] == K):
        x = as_activations(x, K)
    lead = x.shape[:-1]
    y = check_out(out, (*lead, O))
    T = math.prod(lead)
    if T == 0 or O == 0:
        return y
    x2 = x.reshape(T, K)
    y2 = y.reshape(T, O)
    if prepared.format == "dnnl":
        torch.from_numpy(y2).copy_(dnnl_linear(torch.from_numpy(x2), prepared))
        return y
    if prepared.dense is not None:
        xt, yt = torch.from_numpy(x2), torch.from_numpy(y2)
        wt = torch.from_numpy(prepared.dense)
        if prepared.has_bias:
            torch.addmm(torch.from_numpy(prepared.bias), xt, wt.t(), out=yt)
        else:
            torch.mm(xt, wt.t(), out=yt)
        return y
    sparse_into(x2, y2, prepared)
    return y


def sparse_into(x2: np.ndarray, y2: np.ndarray, prepared: PreparedLinear) -> None:
    """The sparse kernel of ``prepared`` on arrays the caller has checked: ``x2`` [T, in_features]
    and ``y2`` [T, out_features], fp32, C-contiguous, ``T >= 1``. No checks (the per-call path of
    :class:`spdy.runtime.SparseLinear`); :func:`linear` is the checked entry point."""
    s = prepared.sparse
    assert s is not None
    T, K = x2.shape
    O = prepared.out_features
    nthreads = 1 if prepared.serial else numba.get_num_threads()
    if nthreads == 1:
        Tp = _spmm.padded_tokens_py(T)
        _spmm.linear_forward_serial(
            x2.reshape(-1), T, K, O, s.ptr, s.n_panels, s.col, s.val, s.blocked, prepared.bias, s.row_cost,
            scratch(0, Tp * K + 64), scratch(1, Tp * O + 64), y2.reshape(-1),
        )
    else:
        tiles_into(x2.reshape(-1), False, 1, T, K, O, prepared, y2.reshape(-1), nthreads)


_NO_CLAMP = np.float32(0.0)
_FLT_MAX = float(np.finfo(np.float32).max)


def tiles_into(x: np.ndarray, channel_major: bool, N: int, HW: int, K: int, O: int, prepared: PreparedLinear,
               y: np.ndarray, nthreads: int, residual: np.ndarray | None = None,
               clamp: tuple[float, float] | None = None) -> None:
    """:func:`spdy.kernels._spmm.tiles_forward` of ``prepared``'s sparse weight on the flat ``x``
    into the flat ``y``, with this thread's scratch: the token tiles split between ``nthreads``
    threads (``channel_major``: x [N, K, HW] and y [N, O, HW], a 1x1 convolution in NCHW).
    An epilogue (a convolution's): ``y = clamp(x W^T + b + residual)``, ``residual`` a flat fp32
    array shaped as ``y``, ``clamp`` a ``(lo, hi)`` range (either may be None)."""
    s = prepared.sparse
    assert s is not None
    args = (x, channel_major, N, HW, K, O, s.ptr, s.n_panels, s.col, s.val, s.blocked, prepared.bias, s.row_cost,
            scratch(0, nthreads * K * _spmm.TILE + 64), scratch(1, nthreads * O * _spmm.TILE + 64), y, nthreads)
    if residual is None and clamp is None:
        _spmm.tiles_forward(*args)
    else:
        _spmm.tiles_forward_epilogue(*args, *epilogue_args(y, residual, clamp))


def epilogue_args(y: np.ndarray, residual: np.ndarray | None,
                  clamp: tuple[float, float] | None) -> tuple[np.ndarray, int, np.float32, np.float32]:
    """The kernels' epilogue arguments ``(r, epi, lo, hi)`` (:func:`spdy.kernels._spmm._store_run`)
    for an optional residual (flat, shaped as ``y``) and clamp range; ``y`` stands in for no residual."""
    epi = (_spmm.EPI_ADD if residual is not None else 0) | (_spmm.EPI_CLAMP if clamp is not None else 0)
    lo, hi = _NO_CLAMP, _NO_CLAMP
    if clamp is not None:  # the kernels are compiled with fastmath, which assumes no infinities
        lo, hi = (np.float32(np.clip(v, -_FLT_MAX, _FLT_MAX)) for v in clamp)
    return (y if residual is None else residual), epi, lo, hi

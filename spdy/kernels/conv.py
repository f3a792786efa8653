"""Conv2d on prepared weights (zero padding, groups=1 for the sparse formats).

Formats: ``dense`` (torch's conv2d, what an unpruned ``nn.Conv2d`` runs),
``dnnl`` (dense, the weight packed once in oneDNN's blocked layout, as Inductor's
weight prepacking runs it: ``torch.ops.mkldnn._convolution_pointwise``; only where
torch has oneDNN) and ``csr`` (the Numba kernels of :mod:`spdy.kernels._conv`:
implicit GEMM without im2col, strides handled by splitting the input into stride
phases; a 1x1 convolution with stride 1 runs as a Linear layer over the pixels, the
tiles of pixels split between threads). The blocked formats are not offered for
convolutions.

Every format takes an epilogue, ``y = clamp(conv(x) + residual)``: what a ResNet's
block does after its last convolution (the skip connection's add, then a ReLU) and a
MobileNet's after most (a ReLU6). ``dnnl`` applies it through oneDNN's post-ops,
``csr`` while the output is in the writing thread's caches (once over each image where a
thread holds whole images, else as each tile is unpacked), ``dense`` as torch ops after.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
import torch

from spdy.errors import InvalidInputError
from spdy.kernels import _conv, _spmm
from spdy.kernels._checks import as_bias, as_weight, check_out
from spdy.kernels._workspace import scratch
from spdy.kernels.linear import (
    DNNL,
    ROW_OVERHEAD,
    PreparedLinear,
    epilogue_args,
    panel_width,
    prepare_linear,
    tiles_into,
    token_waste,
)

log = logging.getLogger(__name__)

CONV_FORMATS: tuple[str, ...] = ("dense", "csr") + (("dnnl",) if DNNL else ())
"""Formats a Conv2d can be prepared in."""

Clamp = tuple[float, float]
"""An epilogue's output range ``(lo, hi)`` (``math.inf`` for no upper bound): a ReLU is ``(0, inf)``."""

L1_PANEL_BYTES = 32 * 1024
_CACHE_SIZE = 8


def _pair(v: Any, what: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)) and len(v) == 2:
        a, b = v
    elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        a = b = v
    else:
        raise InvalidInputError(f"{what} must be an int or a pair of ints; got {v!r}")
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, np.integer)) or not isinstance(b, (int, np.integer)):
        raise InvalidInputError(f"{what} must be an int or a pair of ints; got {v!r}")
    return int(a), int(b)


@dataclass(frozen=True, eq=False)
class _Triplets:
    """Nonzeros of the [O, C, kh, kw] weight in (row, c, dy, dx, value) form."""

    o: np.ndarray
    c: np.ndarray
    dy: np.ndarray
    dx: np.ndarray
    v: np.ndarray


@dataclass(frozen=True, eq=False)
class _ConvPlan:
    ptr: np.ndarray
    col: np.ndarray
    val: np.ndarray
    row_cost: np.ndarray
    n_panels: int


@dataclass(frozen=True, eq=False)
class PreparedConv2d:
    """A Conv2d weight prepared once for fast inference; call it on [N, C, H, W] fp32 arrays."""

    format: str
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    nnz: int
    bias: np.ndarray
    has_bias: bool
    dense: np.ndarray | None = field(default=None, repr=False)
    triplets: _Triplets | None = field(default=None, repr=False)
    pointwise: PreparedLinear | None = field(default=None, repr=False)
    dnnl_input: tuple[int, ...] | None = None  # the input shape the ``dnnl`` weight is packed for
    _plans: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    @property
    def sparsity(self) -> float:
        total = self.out_channels * (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        return 1.0 - self.nnz / total if total else 0.0

    def output_size(self, H: int, W: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return conv2d(x, self, out=out)

    def dnnl_weight(self) -> torch.Tensor:
        """The weight packed in oneDNN's layout (the ``dnnl`` format), made at first use and kept;
        copies and pickles pack again rather than carry it."""
        got = self.__dict__.get("_dnnl")
        if got is None:
            if self.dense is None:
                raise InvalidInputError(f"a {self.format!r} conv weight has no dense copy to pack for oneDNN")
            args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            w = torch.from_numpy(self.dense)
            got = (torch.ops.mkldnn._reorder_convolution_weight(w, *args, list(self.dnnl_input))
                   if self.dnnl_input is not None else torch.ops.mkldnn._reorder_convolution_weight(w, *args))
            object.__setattr__(self, "_dnnl", got)
        return got

    # the per-input-size plan cache and its lock are rebuilt, not copied or pickled
    def __getstate__(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("_plans", "_lock")}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_plans", OrderedDict())
        object.__setattr__(self, "_lock", threading.Lock())

    def __deepcopy__(self, memo: dict[int, Any]) -> PreparedConv2d:
        new = object.__new__(PreparedConv2d)
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def _plan(self, H: int, W: int) -> _ConvPlan:
        """Kernel-ready arrays for inputs of spatial size (H, W), built once per size."""
        key = (H, W)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = _build_plan(self, H, W)
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > _CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan


def _geometry(p: "PreparedConv2d", H: int, W: int) -> tuple[int, int, int, int]:
    """(Hq, Wq, Ho, Wo): phase-plane size and output size for an H x W input."""
    (sh, sw), (ph, pw) = p.stride, p.padding
    Hq = -(-(H + 2 * ph) // sh)
    Wq = -(-(W + 2 * pw) // sw)
    Ho, Wo = p.output_size(H, W)
    return Hq, Wq, Ho, Wo


def _build_plan(p: PreparedConv2d, H: int, W: int) -> _ConvPlan:
    t = p.triplets
    assert t is not None
    O, C = p.out_channels, p.in_channels
    (kh, kw), (sh, sw), (dh, dw) = p.kernel_size, p.stride, p.dilation
    Hq, Wq, _, _ = _geometry(p, H, W)
    K = C * kh * kw
    density = p.nnz / (O * K) if O * K else 0.0
    ey, ex = t.dy * dh, t.dx * dw
    phase = (ey % sh) * sw + ex % sw
    key = ((phase * C + t.c) * Hq + ey // sh) * Wq + ex // sw
    if key.size and key.max() + Hq * Wq >= 2**31:
        raise InvalidInputError(f"input of {C}x{H}x{W} is too large for the int32 offsets of the conv kernel")
    # channels per panel: the activations one token tile of a channel touches
    # (all phases and taps) should fit L1 together with the other channels
    span = 4 * sh * sw * (_spmm.TILE + (dh * (kh - 1) // sh) * Wq + dw * (kw - 1) // sw)
    per_panel = max(1, L1_PANEL_BYTES // span, panel_width(density, K) // (kh * kw))
    n_panels = max(1, -(-C // per_panel))
    pan = t.c // per_panel
    order = np.lexsort((key, t.o, pan))
    counts = np.bincount(pan[order] * O + t.o[order], minlength=n_panels * O)
    ptr = np.zeros(n_panels * O + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    row_cost = np.zeros(O + 1, np.int64)
    np.cumsum(np.bincount(t.o, minlength=O) + ROW_OVERHEAD, out=row_cost[1:])
    return _ConvPlan(
        ptr=ptr.astype(np.int32),
        col=np.ascontiguousarray(key[order], dtype=np.int32),
        val=np.ascontiguousarray(t.v[order], dtype=np.float32),
        row_cost=row_cost,
        n_panels=int(n_panels),
    )


CONV_AUTO_MAX_DENSITY = 0.4
"""``auto`` uses ``csr`` for a conv when density x token waste is below this (sparsity above 60%)."""


def choose_conv_format(weight: np.ndarray, groups: int = 1, pixels: int | None = None) -> str:
    """The format ``auto`` uses for a [O, C/groups, kh, kw] weight: deterministic, O(size), no timing.

    ``csr`` when ``(1 - sparsity) * token_waste(pixels) < 0.4``, else ``dense``;
    ``pixels`` are the output pixels per image, if known. The threshold is
    stricter than for Linear layers because torch's dense conv (oneDNN, ~190
    GFLOP/s at 1 thread here) is twice as fast as its dense Linear (MKL): on
    the three ResNet-50 shapes of ``scripts/bench_kernels.py`` the sparse conv
    breaks even with torch at 40-60% sparsity (1x1: below 40%; 3x3: ~60%).
    Grouped convolutions stay ``dense``.
    """
    w = np.asarray(weight)
    if groups != 1 or w.ndim != 4 or w.size == 0:
        return "dense"
    density = np.count_nonzero(w) / w.size
    return "csr" if density * token_waste(pixels) < CONV_AUTO_MAX_DENSITY else "dense"


def prepare_conv2d(
    weight: Any,
    bias: Any = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    format: str = "auto",
    pixels: int | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> PreparedConv2d:
    """Prepare a dense fp32 [O, C/groups, kh, kw] conv weight (zeros = pruned) once.

    ``padding`` is an int or pair (zero padding) or ``"valid"``/``"same"``
    (``"same"`` only for odd effective kernel sizes). ``format``: ``"auto"``
    or one of :data:`CONV_FORMATS`; the sparse format needs ``groups == 1``.
    ``pixels`` (output pixels per image, if known) informs ``auto``;
    ``input_shape`` ([N, C, H, W], if known) the layout ``dnnl`` packs the weight in
    (any shape runs).
    """
    Wt = as_weight(weight, 4)
    O, Cg, kh, kw = Wt.shape
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise InvalidInputError(f"groups must be a positive int; got {groups!r}")
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1 or kh < 1 or kw < 1:
        raise InvalidInputError(f"stride, dilation and kernel size must be >= 1; got stride {stride}, dilation {dilation}, kernel {kh}x{kw}")
    if padding == "valid":
        ph = pw = 0
    elif padding == "same":
        if (dh * (kh - 1)) % 2 or (dw * (kw - 1)) % 2 or (sh, sw) != (1, 1):
            raise InvalidInputError(
                "padding='same' needs stride 1 and an odd effective kernel size; pass explicit padding instead"
            )
        ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    else:
        ph, pw = _pair(padding, "padding")
        if min(ph, pw) < 0:
            raise InvalidInputError(f"padding must be >= 0; got {padding}")
    b, has_bias = as_bias(bias, O)
    if format == "auto":
        format = choose_conv_format(Wt, groups, pixels)
    if format not in CONV_FORMATS:
        raise InvalidInputError(f"unknown conv format {format!r}; expected 'auto' or one of {CONV_FORMATS}")
    nnz = int(np.count_nonzero(Wt))
    common = dict(
        out_channels=O, in_channels=Cg * groups, kernel_size=(kh, kw), stride=(sh, sw), padding=(ph, pw),
        dilation=(dh, dw), groups=int(groups), nnz=nnz, bias=b, has_bias=has_bias,
    )
    if format == "dense":
        return PreparedConv2d(format="dense", dense=Wt, **common)
    if format == "dnnl":
        shape = None
        if input_shape is not None:
            shape = tuple(int(v) for v in input_shape)
            if len(shape) != 4 or shape[1] != Cg * groups:
                raise InvalidInputError(f"input_shape must be [N, {Cg * groups}, H, W]; got {input_shape!r}")
        p = PreparedConv2d(format="dnnl", dense=Wt, dnnl_input=shape, **common)
        p.dnnl_weight()  # pack now, at load time
        return p
    if groups != 1:
        raise InvalidInputError(f"format {format!r} supports groups=1 only; got groups={groups}. Use format='dense'.")
    o, c, dy, dx = np.nonzero(Wt)
    trip = _Triplets(o=o.astype(np.int64), c=c.astype(np.int64), dy=dy.astype(np.int64), dx=dx.astype(np.int64), v=Wt[o, c, dy, dx])
    pointwise = None
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        # a 1x1 convolution is a Linear layer over the pixels
        pointwise = prepare_linear(Wt.reshape(O, Cg), b if has_bias else None, format="csr")
    return PreparedConv2d(format=format, triplets=trip, pointwise=pointwise, **common)


def conv2d(x: np.ndarray, prepared: PreparedConv2d, out: np.ndarray | None = None,
           residual: np.ndarray | None = None, clamp: Clamp | None = None, channels_last: bool = False) -> np.ndarray:
    """The convolution of fp32 ``x`` [N, C, H, W] (or [C, H, W]); returns [N, O, Ho, Wo] (or [O, Ho, Wo]).

    ``channels_last``: ``x`` is [N, H, W, C] (or [H, W, C]) and the result [N, Ho, Wo, O] (or
    [Ho, Wo, O]), the layout oneDNN's convolutions (the ``dnnl`` format) work in. Epilogue:
    ``residual`` (an array of the output's shape) is added and the result clamped to
    ``clamp = (lo, hi)``, where given."""
    if type(prepared) is not PreparedConv2d:
        raise InvalidInputError(f"prepared must come from prepare_conv2d(); got {type(prepared).__name__}")
    cin = prepared.in_channels
    if not isinstance(x, np.ndarray) or x.ndim not in (3, 4) or x.shape[-1 if channels_last else -3] != cin:
        got = getattr(x, "shape", type(x).__name__)
        want = f"[N, H, W, {cin}] or [H, W, {cin}]" if channels_last else f"[N, {cin}, H, W] or [{cin}, H, W]"
        raise InvalidInputError(f"x must be a numpy array {want}; got {got}")
    if x.dtype.kind not in "fiu":
        raise InvalidInputError(f"x must be numeric (it is converted to float32); got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    squeeze = x.ndim == 3
    x4 = x[None] if squeeze else x
    if channels_last:
        N, H, W, C = x4.shape
    else:
        N, C, H, W = x4.shape
    Ho, Wo = prepared.output_size(H, W)
    if Ho < 1 or Wo < 1:
        raise InvalidInputError(f"input {H}x{W} is smaller than the kernel {prepared.kernel_size} with padding {prepared.padding}")
    O = prepared.out_channels
    dims = (Ho, Wo, O) if channels_last else (O, Ho, Wo)
    shape = dims if squeeze else (N, *dims)
    y = check_out(out, shape)
    r = None
    if residual is not None:
        if not isinstance(residual, np.ndarray) or residual.shape != shape:
            raise InvalidInputError(f"residual must be a numpy array of the output's shape {shape}; "
                                    f"got {getattr(residual, 'shape', type(residual).__name__)}")
        r = np.ascontiguousarray(residual, dtype=np.float32)
    clamp = check_clamp(clamp)
    if N == 0 or O == 0:
        return y
    if prepared.dense is not None:
        xt = torch.from_numpy(x4)
        rt = None if r is None else torch.from_numpy(r.reshape(N, *dims))
        if channels_last:  # torch's NCHW views of the channels-last arrays
            xt = xt.permute(0, 3, 1, 2)
            rt = None if rt is None else rt.permute(0, 3, 1, 2)
        res = torch_conv2d(xt, prepared, rt, clamp)
        y.reshape(N, *dims)[...] = (res.permute(0, 2, 3, 1) if channels_last else res).numpy()
        return y
    nthreads = numba.get_num_threads()
    flat_r = None if r is None else r.reshape(-1)
    if prepared.pointwise is not None:
        # channels last, a 1x1 convolution is a Linear layer on the pixels as they lie
        tiles_into(x4.reshape(-1), not channels_last, N, H * W, C, O, prepared.pointwise, y.reshape(-1), nthreads,
                   flat_r, clamp)
    else:
        implicit_into(x4, prepared, y, nthreads, flat_r, clamp, channels_last)
    return y


def check_clamp(clamp: Any) -> Clamp | None:
    """``clamp`` as a ``(lo, hi)`` pair of floats with ``lo <= hi``, or None; else :class:`InvalidInputError`."""
    if clamp is None:
        return None
    try:
        lo, hi = (float(v) for v in clamp)
    except (TypeError, ValueError):
        raise InvalidInputError(f"clamp must be a (lo, hi) pair of numbers; got {clamp!r}") from None
    if not lo <= hi:
        raise InvalidInputError(f"clamp must have lo <= hi; got {clamp!r}")
    return lo, hi


def torch_conv2d(x: torch.Tensor, prepared: PreparedConv2d, residual: torch.Tensor | None = None,
                 clamp: Clamp | None = None) -> torch.Tensor:
    """The convolution of a dense-format (``dense`` or ``dnnl``) ``prepared`` on a float32 torch
    tensor [N, C, H, W], with the epilogue ``clamp(... + residual)`` (a new tensor). ``dnnl``
    runs oneDNN's fused post-ops where it has them (the add, then a ReLU; a clamp alone), and
    finishes in place otherwise; ``dense`` runs torch's conv2d, then the add and the clamp."""
    bias = torch.from_numpy(prepared.bias) if prepared.has_bias else None
    if prepared.format == "dnnl":
        return dnnl_convolution(x, prepared.dnnl_weight(), bias, prepared.padding, prepared.stride, prepared.dilation,
                                prepared.groups, residual, clamp)
    assert prepared.dense is not None
    y = torch.nn.functional.conv2d(x, torch.from_numpy(prepared.dense), bias, prepared.stride, prepared.padding,
                                   prepared.dilation, prepared.groups)
    if residual is not None:
        y += residual
    return y.clamp_(*clamp) if clamp is not None else y


def dnnl_convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: Sequence[int],
                     stride: Sequence[int], dilation: Sequence[int], groups: int,
                     residual: torch.Tensor | None = None, clamp: Clamp | None = None) -> torch.Tensor:
    """oneDNN's convolution of ``x`` with a ``weight`` packed for it (``_reorder_convolution_weight``),
    then ``clamp(... + residual)``: through its fused post-ops where it has them (the add, then a
    ReLU; a ReLU or a finite clamp alone), in place after it otherwise. The output is channels last."""
    geometry = (list(padding), list(stride), list(dilation), groups)
    pointwise = torch.ops.mkldnn._convolution_pointwise
    relu = clamp is not None and clamp[0] == 0.0 and clamp[1] == math.inf
    if residual is not None:
        y = pointwise(x, residual, weight, bias, *geometry, "add", None, "relu" if relu else None, [], "")
        return y.clamp_(*clamp) if clamp is not None and not relu else y
    if relu:
        return pointwise(x, weight, bias, *geometry, "relu", [], "")
    if clamp is not None and math.isfinite(clamp[0]) and math.isfinite(clamp[1]):
        return pointwise(x, weight, bias, *geometry, "hardtanh", list(clamp), "")
    y = pointwise(x, weight, bias, *geometry, "none", [], "")
    return y.clamp_(*clamp) if clamp is not None else y


def implicit_into(x4: np.ndarray, prepared: PreparedConv2d, y: np.ndarray, nthreads: int,
                  residual: np.ndarray | None = None, clamp: Clamp | None = None, channels_last: bool = False) -> None:
    """The implicit-GEMM kernel (:func:`spdy.kernels._conv.conv_implicit`) of a sparse ``prepared``
    on the checked, C-contiguous fp32 ``x4`` [N, C, H, W] into ``y`` [N, O, Ho, Wo], with this
    thread's scratch. :func:`conv2d` runs it for every sparse convolution but a 1x1 one with
    stride 1 and no padding. Epilogue: ``residual`` (flat, shaped as ``y``) and ``clamp``.
    ``channels_last``: ``x4`` is [N, H, W, C] and ``y`` [N, Ho, Wo, O]."""
    if channels_last:
        N, H, W, C = x4.shape
    else:
        N, C, H, W = x4.shape
    (sh, sw), (ph, pw) = prepared.stride, prepared.padding
    plan = prepared._plan(H, W)
    Hq, Wq, Ho, Wo = _geometry(prepared, H, W)
    O = prepared.out_channels
    xq_size = _conv.phase_buffer_size(C, sh, sw, Hq, Wq)
    _conv.conv_implicit(
        x4.reshape(-1), N, C, H, W, sh, sw, ph, pw, Hq, Wq, Ho, Wo, O, plan.ptr, plan.n_panels, plan.col, plan.val,
        prepared.bias, plan.row_cost, scratch(0, nthreads * xq_size), xq_size, scratch(1, nthreads * O * _spmm.TILE + 64),
        y.reshape(-1), nthreads, *epilogue_args(y.reshape(-1), residual, clamp), channels_last,
    )

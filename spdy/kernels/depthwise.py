"""Depthwise 2-D convolution (one filter per channel) with its padding, bias and clamp in one pass.

In an inverted-residual CNN (MobileNet, EfficientNet) the depthwise convolution sits between
a zero pad (TensorFlow's ``SAME``, asymmetric at stride 2) and a ReLU6; run as three torch ops,
the pad writes a padded copy of a large activation and the activation reads and writes the
output once more. Here one kernel reads the unpadded input, treats the border as zeros, adds
the bias and clamps while the output row is still in the cache.

Layout NCHW, fp32. Two paths, both summing every tap of an output in registers:

* **16 channels at a time** (channels a multiple of 16, planes up to
  :data:`CHANNEL_VECTOR_PIXELS`): the 16 input planes of one image are transposed into a
  zero-bordered scratch holding a 16-lane vector per padded pixel (one lane per channel), four
  output pixels of a row are computed at once (four independent sums, one weight vector load
  per tap), and the results are transposed back into the 16 output planes. Threads take
  contiguous runs of (image, 16-channel group).
* **plane by plane** (any other channel count): the padded plane is split into ``stride x
  stride`` phase planes so that every tap reads a contiguous run, and 16 (or 64) output pixels
  of the flattened plane are computed at once; the columns past the row's end are computed
  and dropped. Threads take contiguous runs of planes.

The zeros around the image are written once per thread and call: every plane of a call has
the same geometry, so only the pixels inside the image are copied per plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit, prange

from spdy.errors import InvalidInputError
from spdy.kernels._simd import copy_n, ld, transpose16, vbroadcast, vfma, vload, vmax, vmin, vstore
from spdy.kernels._spmm import _row16, _row64

_JIT = dict(cache=True, fastmath=True, boundscheck=False, nogil=True)
CHANNEL_VECTOR_PIXELS = 1 << 16
"""Input planes of at most this many pixels (and channels in multiples of 16) go 16 channels
at a time, a vector per pixel; larger planes one at a time, a vector per 16 pixels of a row."""


@dataclass(frozen=True)
class Padding:
    """Zeros added around the image: rows above and below, columns left and right."""

    top: int = 0
    bottom: int = 0
    left: int = 0
    right: int = 0

    @classmethod
    def symmetric(cls, rows: int, cols: int) -> Padding:
        return cls(rows, rows, cols, cols)

    def __add__(self, other: Padding) -> Padding:
        return Padding(self.top + other.top, self.bottom + other.bottom, self.left + other.left,
                       self.right + other.right)


@njit(**_JIT)
def _fill_phases(x, xo, h_in, w_in, sh, sw, top, left, hph, wph, ph):
    """Copy one input plane into its phase planes: phase ``(a, b)`` holds padded pixel
    ``(r * sh + a, j * sw + b)`` at ``ph[((a * sw + b) * hph + r) * wph + j]``. Only pixels
    inside the image are written: the zeros around them were set once per thread (every
    plane of a call has the same geometry)."""
    for a in range(sh):
        for b in range(sw):
            base = (a * sw + b) * hph * wph
            # the first phase column inside the image, and its input column
            j0 = (left - b + sw - 1) // sw if left > b else 0
            c0 = j0 * sw + b - left
            if c0 >= w_in:
                continue
            n = min(wph - j0, (w_in - c0 + sw - 1) // sw)
            r0 = (top - a + sh - 1) // sh if top > a else 0
            for r in range(r0, hph):
                iy = r * sh + a - top
                if iy >= h_in:
                    break
                o = base + r * wph + j0
                src = xo + iy * w_in + c0
                for j in range(n):
                    ph[o + j] = ld(x, src + j * sw)


@njit(**_JIT)
def _tap_offsets(kh, kw, sh, sw, hph, wph):
    """Where tap ``(ky, kx)`` reads for output 0: its phase plane, row ``ky // sh`` and column
    ``kx // sw`` of it (output ``q`` reads at offset + q)."""
    offs = np.empty(kh * kw, np.int64)
    for ky in range(kh):
        for kx in range(kw):
            offs[ky * kw + kx] = ((ky % sh) * sw + kx % sw) * hph * wph + (ky // sh) * wph + kx // sw
    return offs


@njit(**_JIT)
def _plane(x, xo, w, wo, taps, bias, out, oo, h_in, w_in, h_out, w_out, sh, sw, top, left, hph, wph,
           lo, hi, clamp, ph, ext):
    """One channel plane. Output pixel ``(oy, ox)`` is ``ext[oy * wph + ox]``, computed 64 (then 16)
    at a time with every tap summed in registers (the columns ``ox >= w_out`` are computed and dropped)."""
    _fill_phases(x, xo, h_in, w_in, sh, sw, top, left, hph, wph, ph)
    n = h_out * wph
    nt = taps.shape[0]
    wc = w[wo:wo + nt]
    # output q sums the taps as a sparse row sums its nonzeros: "column" taps[t] of the phase planes
    q = 0
    while q + 64 <= n:
        _row64(taps, wc, 0, nt, 1, ph, q, ext, q, True, bias)
        q += 64
    while q < n:
        _row16(taps, wc, 0, nt, 1, ph, q, ext, q, True, bias)
        q += 16
    for oy in range(h_out):
        e = oy * wph
        o = oo + oy * w_out
        if clamp:
            for ox in range(w_out):
                v = ld(ext, e + ox)
                out[o + ox] = lo if v < lo else (hi if v > hi else v)
        else:
            copy_n(out, o, ext, e, w_out)


@njit(**_JIT)
def _group(x, xo, hw, wv, bias, out, oo, h_in, w_in, h_out, w_out, sh, sw, top, left, wp, lo, hi, clamp,
           pad, tmp, res, taps):
    """16 channels of one image at once, a 16-lane vector per pixel (one lane per channel):
    the planes are transposed into ``pad`` ([padded pixel][16], zeros around set once per
    thread), every output pixel sums its taps in one register, and ``res`` ([pixel][16]) is
    transposed back into the 16 output planes. ``wv`` [taps][16], ``bias`` [16]."""
    k = 0
    while k + 16 <= hw:
        transpose16(x, xo + k, hw, tmp, 0, 16)
        for j in range(16):
            iy, ix = (k + j) // w_in, (k + j) % w_in
            vstore(pad, ((iy + top) * wp + ix + left) * 16, vload(tmp, j * 16))
        k += 16
    for p in range(k, hw):
        iy, ix = p // w_in, p % w_in
        d = ((iy + top) * wp + ix + left) * 16
        for ch in range(16):
            pad[d + ch] = ld(x, xo + ch * hw + p)
    nt = taps.shape[0]
    b = vload(bias, 0)
    vlo, vhi = vbroadcast(lo), vbroadcast(hi)
    step = sw * 16
    for oy in range(h_out):
        ox = 0
        while ox + 4 <= w_out:  # four pixels of the row: four independent sums, one weight load per tap
            base = (oy * sh * wp + ox * sw) * 16
            a0, a1, a2, a3 = b, b, b, b
            for t in range(nt):
                w_t = vload(wv, t * 16)
                p = base + ld(taps, t)
                a0 = vfma(a0, w_t, vload(pad, p))
                a1 = vfma(a1, w_t, vload(pad, p + step))
                a2 = vfma(a2, w_t, vload(pad, p + 2 * step))
                a3 = vfma(a3, w_t, vload(pad, p + 3 * step))
            if clamp:
                a0, a1 = vmin(vmax(a0, vlo), vhi), vmin(vmax(a1, vlo), vhi)
                a2, a3 = vmin(vmax(a2, vlo), vhi), vmin(vmax(a3, vlo), vhi)
            r = (oy * w_out + ox) * 16
            vstore(res, r, a0)
            vstore(res, r + 16, a1)
            vstore(res, r + 32, a2)
            vstore(res, r + 48, a3)
            ox += 4
        for ox in range(ox, w_out):
            base = (oy * sh * wp + ox * sw) * 16
            acc = b
            for t in range(nt):
                acc = vfma(acc, vload(wv, t * 16), vload(pad, base + ld(taps, t)))
            if clamp:
                acc = vmin(vmax(acc, vlo), vhi)
            vstore(res, (oy * w_out + ox) * 16, acc)
    n = h_out * w_out
    k = 0
    while k + 16 <= n:
        transpose16(res, k * 16, 16, out, oo + k, n)
        k += 16
    for p in range(k, n):
        for ch in range(16):
            out[oo + ch * n + p] = ld(res, p * 16 + ch)


@njit(parallel=True, **_JIT)
def depthwise_forward16(x, wv, bias, out, c, h_in, w_in, kh, kw, h_out, w_out, sh, sw, top, left, hp, wp,
                        lo, hi, clamp, nthreads):
    """:func:`depthwise_forward` for ``C % 16 == 0``, 16 channels at a time (:func:`_group`):
    ``wv`` [C / 16, KH * KW, 16], ``bias`` [C]; threads take contiguous runs of (image, group)."""
    hw, n_out = h_in * w_in, h_out * w_out
    groups = c // 16
    tasks = x.shape[0] // (hw * 16)
    per = (tasks + nthreads - 1) // nthreads
    taps = np.empty(kh * kw, np.int64)
    for ky in range(kh):
        for kx in range(kw):
            taps[ky * kw + kx] = (ky * wp + kx) * 16
    for t in prange(nthreads):
        pad = np.zeros(hp * wp * 16 + 16, np.float32)
        tmp = np.empty(256, np.float32)
        res = np.empty(n_out * 16 + 16, np.float32)
        for task in range(t * per, min(tasks, (t + 1) * per)):
            g = task % groups
            _group(x, task * 16 * hw, hw, wv[g * kh * kw * 16:(g + 1) * kh * kw * 16], bias[g * 16:(g + 1) * 16],
                   out, task * 16 * n_out, h_in, w_in, h_out, w_out, sh, sw, top, left, wp, lo, hi, clamp,
                   pad, tmp, res, taps)


def scratch_sizes(h_in: int, w_in: int, kh: int, kw: int, sh: int, sw: int, pad: Padding) -> tuple[int, int, int, int]:
    """``(hph, wph, phase scratch, output scratch)`` in floats for one plane (with room for the
    last vector's reads past the end)."""
    hph = -(-(h_in + pad.top + pad.bottom) // sh)
    wph = -(-(w_in + pad.left + pad.right) // sw)
    h_out = output_size(h_in, kh, sh, pad.top, pad.bottom)
    ext = -(-(h_out * wph) // 64) * 64 + 64
    return hph, wph, sh * sw * hph * wph + ext + (kh // sh + 1) * wph + kw, ext


@njit(parallel=True, **_JIT)
def depthwise_forward(x, w, bias, out, c, h_in, w_in, kh, kw, h_out, w_out, sh, sw, top, left, hph, wph,
                      n_ph, n_ext, lo, hi, clamp, nthreads):
    """``out[n, c] = clamp(conv(x[n, c], w[c]) + bias[c])`` for every plane of the flat arrays
    ``x``, ``out`` and ``w`` ([C * KH * KW]); threads take contiguous runs of planes, each with
    its own scratch."""
    planes = x.shape[0] // (h_in * w_in)
    per = (planes + nthreads - 1) // nthreads
    taps = _tap_offsets(kh, kw, sh, sw, hph, wph)
    for t in prange(nthreads):
        ph = np.zeros(n_ph, np.float32)
        ext = np.empty(n_ext, np.float32)
        for p in range(t * per, min(planes, (t + 1) * per)):
            ch = p % c
            _plane(x, p * h_in * w_in, w, ch * kh * kw, taps, bias[ch], out, p * h_out * w_out, h_in, w_in,
                   h_out, w_out, sh, sw, top, left, hph, wph, lo, hi, clamp, ph, ext)


def output_size(size: int, kernel: int, stride: int, before: int, after: int) -> int:
    return (size + before + after - kernel) // stride + 1


def unsupported(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> str | None:
    """Why :func:`depthwise_conv2d` cannot run this call (None: it can)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or weight.dtype != torch.float32:
        return f"it takes float32 CPU tensors; got {x.dtype} on {x.device}"
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        return f"it takes x [N, C, H, W] and one filter per channel [C, 1, KH, KW]; got {tuple(x.shape)} and {tuple(weight.shape)}"
    if tuple(dilation) != (1, 1):
        return f"it has no dilation; got {tuple(dilation)}"
    if min(stride) < 1 or max(stride) > 4:
        return f"it takes strides 1-4; got {tuple(stride)}"
    if x.requires_grad and torch.is_grad_enabled():
        return "it is for inference and the input requires grad"
    return None


def grouped_weight(weight: torch.Tensor) -> np.ndarray | None:
    """The filters ``[C, 1, KH, KW]`` as the 16-channel path reads them, ``[C / 16, KH * KW, 16]``
    flat (tap ``t`` of 16 channels side by side); None when ``C`` is not a multiple of 16. A
    module that runs the same weight again and again computes it once (:func:`depthwise_unchecked`)."""
    c, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
    if c % 16:
        return None
    w = weight.detach().numpy().reshape(c // 16, 16, kh * kw)
    return np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(-1)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: tuple[int, int] = (1, 1), padding: Padding = Padding(),
                     clamp: tuple[float, float] | None = None) -> torch.Tensor:
    """``clamp(conv2d(pad(x), weight, bias, stride, groups=C))`` of a float32 CPU batch ``x``
    [N, C, H, W] with ``weight`` [C, 1, KH, KW]; ``padding`` adds zeros (no padded copy is made),
    ``clamp=(lo, hi)`` clamps the output (``(0, 6)``: ReLU6, ``(0, inf)``: ReLU)."""
    why = unsupported(x, weight, stride)
    if why:
        raise InvalidInputError(f"depthwise_conv2d cannot run this call: {why}")
    if min(padding.top, padding.bottom, padding.left, padding.right) < 0:
        raise InvalidInputError(f"padding must be >= 0; got {padding}")
    return depthwise_unchecked(x, weight, bias, stride, padding, clamp)


def depthwise_unchecked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                        padding: Padding, clamp: tuple[float, float] | None,
                        grouped: np.ndarray | None = None) -> torch.Tensor:
    """:func:`depthwise_conv2d` for a call :func:`unsupported` accepted and padding >= 0;
    ``grouped``: :func:`grouped_weight` of ``weight``, if the caller keeps it (computed otherwise)."""
    n, c, h, w_in = x.shape
    kh, kw = weight.shape[2:]
    h_out = output_size(h, kh, stride[0], padding.top, padding.bottom)
    w_out = output_size(w_in, kw, stride[1], padding.left, padding.right)
    if h_out < 1 or w_out < 1:
        raise InvalidInputError(f"the {kh}x{kw} filter does not fit the padded {h}x{w_in} input")
    a = x.detach().numpy()
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    b = np.zeros(c, np.float32) if bias is None else bias.detach().numpy()
    # finite bounds: the kernel is compiled without inf semantics (fastmath)
    big = float(np.finfo(np.float32).max)
    lo, hi = (-big, big) if clamp is None else (max(float(clamp[0]), -big), min(float(clamp[1]), big))
    out = np.empty((n, c, h_out, w_out), np.float32)
    if out.size:
        sh, sw = int(stride[0]), int(stride[1])
        args = (int(padding.top), int(padding.left))
        bounds = (np.float32(lo), np.float32(hi), clamp is not None)
        if c % 16 == 0 and h * w_in <= CHANNEL_VECTOR_PIXELS:
            threads = max(1, min(numba.get_num_threads(), n * c // 16))
            wv = grouped_weight(weight) if grouped is None else grouped
            hp, wp = h + padding.top + padding.bottom, w_in + padding.left + padding.right
            depthwise_forward16(a.reshape(-1), wv, b, out.reshape(-1), c, h, w_in, kh, kw, h_out, w_out, sh, sw,
                                *args, hp, wp, *bounds, threads)
        else:
            wt = np.ascontiguousarray(weight.detach().numpy()).reshape(-1)
            hph, wph, n_ph, n_ext = scratch_sizes(h, w_in, kh, kw, sh, sw, padding)
            threads = max(1, min(numba.get_num_threads(), n * c))
            depthwise_forward(a.reshape(-1), wt, b, out.reshape(-1), c, h, w_in, kh, kw, h_out, w_out,
                              sh, sw, *args, hph, wph, n_ph, n_ext, *bounds, threads)
    return torch.from_numpy(out)

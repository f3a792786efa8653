"""Softmax attention on spdy's own kernel: ``softmax(Q K^T * scale + mask) V`` for inference.

:func:`attention` takes what :func:`torch.nn.functional.scaled_dot_product_attention`
takes (``[B, H, T, D]`` queries, keys and values, an optional boolean or additive
mask broadcastable to ``[B, 1, Tq, Tk]``) and returns the result in the layout a
transformer needs next, ``[B, Tq, H, D]`` (contiguous: ``.view(B, Tq, H * D)`` feeds
the output projection). It reads the heads in place when they are views of a
``[B, T, H * D]`` projection output (as Hugging Face's models make them); other
layouts are copied first. fp32 on CPU, no autograd, ``D`` a multiple of 32
(:func:`unsupported` says why a call is not).

The kernel (:mod:`spdy.kernels._attention`) keeps four query rows' scores or outputs in
registers per key or value row loaded and takes the softmax's exp as a 16-lane polynomial;
on the 2-core Zen 5 machines it ran in 0.61x of torch's SDPA time on 2 threads and 0.76x
on 1 (MiniLM's shapes; BENCHMARKS.md, section 2).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from spdy.errors import InvalidInputError
from spdy.kernels import _attention
from spdy.kernels._workspace import scratch

NEG = _attention.NEG
_SLOT = 2  # scratch slot (the Linear kernels use 0 and 1)


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                dropout: float = 0.0) -> str | None:
    """Why :func:`attention` cannot run these inputs (``None`` when it can)."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a tensor"
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return f"{name} is {t.dtype} on {t.device}; the kernel runs float32 on CPU"
        if t.dim() != 4:
            return f"{name} has shape {tuple(t.shape)}; expected [batch, heads, tokens, head_dim]"
        if t.requires_grad and torch.is_grad_enabled():
            return f"{name} requires grad; the kernel is for inference"
    B, H, Tq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        return f"shapes do not match: query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}"
    if D % 32 or D == 0:
        return f"head_dim {D} is not a multiple of 32"
    if Tq == 0 or k.shape[2] == 0 or B == 0 or H == 0:
        return "an empty dimension"
    if dropout:
        return f"dropout {dropout} (the kernel does inference only)"
    return mask_unsupported(mask, B, Tq, k.shape[2])


def mask_unsupported(mask: torch.Tensor | None, B: int, Tq: int, Tk: int) -> str | None:
    """Why the kernel cannot take ``mask`` for ``B`` sequences of ``Tq`` queries and ``Tk`` keys
    (``None`` when it can: no mask, or one that :func:`mask_bias` expands to every head)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        return f"mask is a {type(mask).__name__}"
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if mask.dim() > 4 or shape[1] != 1:
        return f"mask shape {tuple(mask.shape)}: one mask per head is not supported"
    # each dimension 1 or the scores' own (what mask_bias expands); a plain loop, since
    # torch.broadcast_shapes costs ~11 us a call, which the encoder paid in every layer
    target = (B, 1, Tq, Tk)
    if any(m != 1 and m != t for m, t in zip(shape, target)):
        return f"mask shape {tuple(mask.shape)} does not broadcast to {target}"
    return None


def _flat(t: torch.Tensor) -> tuple[np.ndarray, int, int]:
    """(flat array, batch stride, token stride) of a [B, H, T, D] tensor as [B, T, H, D] in
    memory: read in place when it is a view of a [B, T, H * D] projection output, else copied."""
    B, H, T, D = t.shape
    a = t.detach().numpy().transpose(0, 2, 1, 3)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a.reshape(-1), T * H * D, H * D


def attention_qkv_unchecked(qkv: np.ndarray, B: int, T: int, H: int, D: int, bias: np.ndarray | None,
                            scale: float) -> torch.Tensor:
    """Self-attention over one fused projection output, read in place: ``qkv`` the flat
    [B, T, 3 * H * D] fp32 array of the query, key and value projections side by side per token
    (:func:`spdy.kernels.qkv.qkv_into`), ``D`` a multiple of 32, ``bias`` from :func:`mask_bias`
    (the mask accepted by :func:`mask_unsupported`). Returns [B, T, H, D], as :func:`attention`."""
    width = H * D
    bs, ts = T * 3 * width, 3 * width
    return _heads((qkv, 0, bs, ts), (qkv, width, bs, ts), (qkv, 2 * width, bs, ts), B, H, T, T, D, bias, scale)


def mask_bias(mask: torch.Tensor | None, B: int, Tq: int, Tk: int) -> np.ndarray | None:
    """The mask as the kernel's additive scores, [B, Tq, Tkp] fp32 (``NEG`` where masked, pad
    keys included); ``None`` when nothing is masked."""
    if mask is None:
        return None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(B, 1, Tq, Tk)[:, 0]
    if m.dtype == torch.bool:
        if bool(m.all()):
            return None
        scores = torch.where(m, 0.0, NEG)
    else:
        scores = m.float().clamp(min=NEG)
    Tkp = _attention.padded_keys(Tk)
    bias = np.full((B, Tq, Tkp), NEG, np.float32)
    bias[:, :, :Tk] = scores.numpy()
    return bias


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` as ``[B, Tq, H, D]`` (SDPA's result transposed to
    token-major). ``scale`` defaults to ``1 / sqrt(D)``; a boolean ``mask`` keeps the True
    entries. Raises :class:`~spdy.errors.InvalidInputError` for what :func:`unsupported` names.
    Runs on the calling thread's thread count (:func:`spdy.kernels.set_num_threads`)."""
    why = unsupported(q, k, v, mask)
    if why is not None:
        raise InvalidInputError(f"spdy attention cannot run this call: {why}; use "
                                "torch.nn.functional.scaled_dot_product_attention instead")
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    return attention_unchecked(q, k, v, mask_bias(mask, B, Tq, Tk), D ** -0.5 if scale is None else float(scale))


def attention_unchecked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: np.ndarray | None,
                        scale: float) -> torch.Tensor:
    """:func:`attention` on inputs :func:`unsupported` accepted, with the mask already made
    into :func:`mask_bias` (reused across a model's layers)."""
    B, H, Tq, D = q.shape
    qa, qbs, qs = _flat(q)
    ka, kbs, ks = _flat(k)
    va, vbs, vs = _flat(v)
    return _heads((qa, 0, qbs, qs), (ka, 0, kbs, ks), (va, 0, vbs, vs), B, H, Tq, k.shape[2], D, bias, scale)


def _heads(q: tuple[np.ndarray, int, int, int], k: tuple[np.ndarray, int, int, int],
           v: tuple[np.ndarray, int, int, int], B: int, H: int, Tq: int, Tk: int, D: int, bias: np.ndarray | None,
           scale: float) -> torch.Tensor:
    """The kernel over (flat array, offset, batch stride, token stride) of each of query, key and
    value (:func:`spdy.kernels._attention.attention_forward`), on this thread's scratch; [B, Tq, H, D]."""
    out = np.empty(B * Tq * H * D, np.float32)
    nthreads = max(1, min(numba.get_num_threads(), B * H))
    Tkp = _attention.padded_keys(Tk)
    work = scratch(_SLOT, nthreads * (2 * D + 4) * Tkp + 64)
    has_bias = bias is not None
    _attention.attention_forward(*q, *k, *v, B, H, Tq, Tk, D, float(scale),
                                 bias.reshape(-1) if has_bias else work[:16], has_bias, work, out, nthreads)
    return torch.from_numpy(out.reshape(B, Tq, H, D))

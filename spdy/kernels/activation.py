"""GELU (the exact, erf form) on spdy's vector kernels, for inference.

torch's exact GELU evaluates erf element by element; here erf is a rational function of
16-lane vectors (:func:`spdy.kernels._simd.verf`, absolute error below 5e-7), and threads
take contiguous chunks. :func:`gelu` takes and returns fp32 CPU tensors of any shape.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from spdy.errors import InvalidInputError
from spdy.kernels._simd import vbroadcast, verf, vfma, vload, vmul, vstore

_JIT = dict(cache=True, fastmath=True, boundscheck=False, nogil=True)
_SQRT_HALF = 0.7071067811865476
CHUNK = 4096
"""Elements per unit of work the threads share."""


@njit(**_JIT)
def gelu_range(x, y, i0, i1):
    """``y[i0:i1] = gelu(x[i0:i1])`` on the calling thread (``x`` may be ``y``)."""
    half = vbroadcast(0.5)
    s = vbroadcast(_SQRT_HALF)
    i = i0
    while i + 16 <= i1:
        v = vload(x, i)
        hv = vmul(half, v)
        vstore(y, i, vfma(hv, hv, verf(vmul(v, s))))  # x/2 + x/2 erf(x / sqrt 2)
        i += 16
    for j in range(i, i1):
        y[j] = 0.5 * x[j] * (1.0 + math.erf(x[j] * _SQRT_HALF))


@njit(parallel=True, **_JIT)
def gelu_forward(x, y, n, nthreads):
    """``y[:n] = gelu(x[:n])``; threads take contiguous runs of 16-aligned elements."""
    per = (n // nthreads + 15) // 16 * 16
    for c in prange(nthreads):
        i0 = min(c * per, n)
        i1 = n if c == nthreads - 1 else min(i0 + per, n)
        gelu_range(x, y, i0, i1)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * (1 + erf(x / sqrt(2))) / 2`` of a float32 CPU tensor, as a new contiguous tensor."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
        raise InvalidInputError(f"gelu takes a float32 CPU tensor; got "
                                f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}"
                                f"{' on ' + str(x.device) if isinstance(x, torch.Tensor) else ''}")
    if x.requires_grad and torch.is_grad_enabled():
        raise InvalidInputError("gelu is for inference: the input requires grad; use torch.nn.functional.gelu")
    a = x.detach().numpy()
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    y = np.empty(a.shape, np.float32)
    n = a.size
    if n:
        threads = max(1, min(numba.get_num_threads(), n // CHUNK))
        gelu_forward(a.reshape(-1), y.reshape(-1), n, threads)
    return torch.from_numpy(y)

"""CPU sparse execution: Numba kernels that turn unstructured sparsity into speed.

Public API (stable; the profilers and the search build on it):

* :data:`FORMATS` / :data:`CONV_FORMATS` - weight formats, ``"dense"`` included.
* :func:`prepare_linear` (W [out, in] fp32, zeros = pruned; once, at load time)
  -> :class:`PreparedLinear`; :func:`linear` (or calling it) runs
  ``y = x W^T + b`` on fp32 numpy arrays ``[..., in]``.
* :func:`prepare_conv2d` -> :class:`PreparedConv2d`; :func:`conv2d` (numpy), :func:`torch_conv2d` (torch, dense formats).
* :func:`choose_format` / :func:`choose_conv_format` - what ``format="auto"``
  picks: a deterministic O(weight size) rule, see their docstrings. A profiler
  that times "each level in the format the runtime will really use" prepares
  with ``format="auto"`` (or ``choose_format(W, tokens)``) and times that.
* :func:`set_num_threads` - one thread count for torch and Numba.
* :func:`warmup` - compile (or load from cache) every kernel up front.
* :func:`retain_freed_memory` - keep freed activation memory in the process (glibc),
  so that layers do not page-fault their outputs in on every call.

Importing this package first (before torch) makes torch and Numba share one
OpenMP runtime, see :mod:`spdy.kernels._openmp`; :func:`openmp_status` says
whether that worked.
"""

from __future__ import annotations

# must run before anything imports torch
from spdy.kernels._openmp import openmp_status, share_openmp_runtime

share_openmp_runtime()

import time  # noqa: E402

import numpy as np  # noqa: E402

from spdy.kernels._alloc import allocator_status, retain_freed_memory  # noqa: E402
from spdy.kernels.conv import (  # noqa: E402
    CONV_FORMATS,
    PreparedConv2d,
    choose_conv_format,
    conv2d,
    prepare_conv2d,
    torch_conv2d,
)
from spdy.kernels.linear import (  # noqa: E402
    DNNL,
    FORMATS,
    PreparedLinear,
    choose_format,
    dnnl_linear,
    is_serial,
    linear,
    panel_width,
    prepare_linear,
)
from spdy.kernels.threads import (  # noqa: E402
    get_num_threads,
    limit_openmp_nesting,
    set_num_threads,
    threading_layer,
)

__all__ = [
    "FORMATS",
    "DNNL",
    "dnnl_linear",
    "is_serial",
    "CONV_FORMATS",
    "PreparedLinear",
    "PreparedConv2d",
    "prepare_linear",
    "prepare_conv2d",
    "linear",
    "conv2d",
    "torch_conv2d",
    "choose_format",
    "choose_conv_format",
    "panel_width",
    "set_num_threads",
    "get_num_threads",
    "threading_layer",
    "openmp_status",
    "warmup",
    "retain_freed_memory",
    "allocator_status",
]


def warmup() -> float:
    """Compile (first run) or load from Numba's on-disk cache every kernel; returns seconds taken."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((20, 24)) * (rng.random((20, 24)) > 0.5)).astype(np.float32)
    for fmt in FORMATS:
        p = prepare_linear(W, np.ones(20, np.float32), format=fmt)
        for T in (1, 20, 40, 70):
            linear(rng.standard_normal((T, 24)).astype(np.float32), p)
    Wc = (rng.standard_normal((4, 3, 3, 3)) * (rng.random((4, 3, 3, 3)) > 0.5)).astype(np.float32)
    for stride in (1, 2, 3):
        for pad in (0, 1):
            pc = prepare_conv2d(Wc, None, stride=stride, padding=pad, format="csr")
            conv2d(rng.standard_normal((1, 3, 9, 8)).astype(np.float32), pc)
    limit_openmp_nesting()  # Numba's pool has started now, and with it nested OpenMP
    return time.perf_counter() - t0

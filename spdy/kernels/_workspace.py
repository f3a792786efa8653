"""Reusable, 64-byte aligned scratch buffers for the kernels.

The sparse kernels relay activations into a token-contiguous layout and read
them with 64-byte vector loads; buffers that are not 64-byte aligned split
every load across two cache lines (measured: 65 instead of 120 GFLOP/s). numpy
only guarantees 16 bytes, so the buffers are carved out of a larger allocation.

One set of buffers per Python thread, grown on demand and shared by all layers
that thread runs, so a model's layers reuse the same, cache-warm memory.
"""

from __future__ import annotations

import threading

import numpy as np

ALIGN = 64
_local = threading.local()


def aligned_empty(n: int, dtype: type = np.float32) -> np.ndarray:
    """A new 1-D array of ``n`` elements whose data starts on a 64-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n * itemsize + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + n * itemsize].view(dtype)


def scratch(slot: int, n: int) -> np.ndarray:
    """A 64-byte aligned fp32 buffer of at least ``n`` elements, private to this thread.

    Contents are undefined. Each ``slot`` (a small int) is an independent
    buffer, so one call can hold several at once.
    """
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < n:
        # grow geometrically so a model with increasing shapes reallocates rarely
        size = max(n, int(buf.size * 1.5) if buf is not None else 0, 4096)
        buf = bufs[slot] = aligned_empty(size)
    return buf

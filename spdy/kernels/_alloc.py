"""Keep freed memory in the process instead of handing it back to the OS after every op.

A CNN's activations are megabytes each (the digits ResNet: 4 MiB per conv output at batch
32). With glibc's defaults such a buffer is ``mmap``-ed for one op and returned on free,
or the top of the heap is trimmed, so the next op page-faults its output in again: every
layer pays for fresh pages, a cost of the same order as the layer's arithmetic for a
small CNN. Raising glibc's mmap and trim thresholds keeps such buffers on the heap and
reused. Peak memory is unchanged;
memory freed after the peak stays with the process (up to ``limit`` bytes at the top of
the heap) until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: the largest block served from the heap, and the free heap top kept, when retaining
DEFAULT_LIMIT = 256 << 20

_state: dict[str, Any] = {"retained": False, "limit": None}


def retain_freed_memory(limit: int = DEFAULT_LIMIT) -> bool:
    """Serve blocks up to ``limit`` bytes from the heap and keep up to ``limit`` free at its top.

    glibc only (``mallopt``); elsewhere nothing changes and it returns False. Idempotent.
    """
    if _state["retained"]:
        return True
    if not sys.platform.startswith("linux"):
        log.debug("freed memory not retained: not glibc (%s)", sys.platform)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        log.debug("freed memory not retained: no mallopt (%s)", exc)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(limit)) == 1 and mallopt(_M_TRIM_THRESHOLD, int(limit)) == 1
    _state.update(retained=ok, limit=int(limit) if ok else None)
    log.debug("malloc %s freed memory (mmap and trim thresholds %d bytes)", "keeps" if ok else "refused to keep", limit)
    return ok


def allocator_status() -> dict[str, Any]:
    """Whether :func:`retain_freed_memory` is in effect (for fingerprints)."""
    return {"retain_freed": bool(_state["retained"]), "limit": _state["limit"]}

"""One thread count for every library that runs a pruned model's layers.

Dense layers and everything between the sparse ones run in torch's OpenMP
pool; the sparse kernels run in Numba's. Both pools must be sized the same,
explicitly, or a two-thread run ends up with four busy threads on two cores.
Sized the same, torch's pool and Numba's OpenMP pool alternate without slowing
each other. ``OMP_WAIT_POLICY=PASSIVE`` makes both much slower per call (sleeping
workers are woken by futex for every parallel region), and Numba's ``workqueue``
layer costs far more per parallel call than its ``omp`` layer, which spdy uses.
"""

from __future__ import annotations

import logging
import os

import numba
import torch

from spdy.errors import InvalidInputError

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in torch (intra-op) and in the Numba kernels.

    Numba's setting is per calling thread: call this from the thread that
    runs the model. ``n`` above Numba's pool size (``NUMBA_NUM_THREADS``,
    default: all cores) is refused.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInputError(f"threads must be a positive int; got {n!r}. Pass e.g. 1 or 2.")
    limit = numba.config.NUMBA_NUM_THREADS
    if n > limit:
        raise InvalidInputError(
            f"threads={n} exceeds Numba's pool of {limit} threads; "
            f"pass threads <= {limit} or start Python with NUMBA_NUM_THREADS={n}."
        )
    # Numba first: starting its pool may reset OpenMP's thread-count setting,
    # which torch reads when both share one OpenMP runtime (measured: torch
    # silently back at 2 threads after set_num_threads(1) in the other order)
    numba.set_num_threads(n)
    torch.set_num_threads(n)
    limit_openmp_nesting()
    if n > available_cores():
        log.warning("threads=%d but only %d cores are available: the threads will contend", n, available_cores())
    if n > 1:
        from spdy.kernels._openmp import openmp_status

        st = openmp_status()
        if not st["shared"]:
            log.warning(
                "torch and Numba run on separate OpenMP runtimes (%s; %s): with %d threads their idle "
                "workers spin against each other and calls can stall for milliseconds. Import spdy.kernels "
                "or spdy.runtime before torch.",
                ", ".join(st["libgomp_files"]), st["attempt"], n,
            )


def limit_openmp_nesting() -> bool:
    """Turn off nested OpenMP parallelism when torch and Numba share one OpenMP runtime.

    Numba's ``omp`` threading layer enables nesting when it starts its pool
    (``omp_set_nested(1)``). Torch's nested regions (BLAS/oneDNN inside
    ``at::parallel_for``) then start extra teams: measured on the 2-core machines, a
    MiniLM forward took 265 ms instead of 18 ms; ``omp_set_max_active_levels(1)``
    restores 18 ms and leaves the sparse kernels as fast. Returns True if it changed anything.
    """
    from spdy.kernels._openmp import openmp_status

    if not openmp_status().get("shared"):
        return False
    try:
        import ctypes

        gomp = ctypes.CDLL("libgomp.so.1")  # the copy already loaded, shared by torch and Numba
        if gomp.omp_get_max_active_levels() > 1:
            gomp.omp_set_max_active_levels(1)
            log.info("limited OpenMP nesting to one level (Numba had enabled it)")
            return True
    except (OSError, AttributeError) as exc:
        log.warning("could not limit OpenMP nesting: %s", exc)
    return False


def get_num_threads() -> int:
    """The Numba thread count of the calling thread (what the sparse kernels use)."""
    return int(numba.get_num_threads())


def threading_layer() -> str:
    """Numba's threading layer after the first parallel kernel ran (``omp``, ``tbb`` or ``workqueue``)."""
    try:
        return str(numba.threading_layer())
    except ValueError:  # no parallel kernel has run yet
        return "not started"

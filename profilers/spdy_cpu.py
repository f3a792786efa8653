"""``spdy-cpu``: the project's own CPU sparse kernels (:mod:`spdy.kernels` via :mod:`spdy.runtime`).

A pruned model runs in PyTorch with its prunable layers swapped for
:class:`spdy.runtime.SparseLinear` / :class:`spdy.runtime.SparseConv2d` (the rest of
the model, and dense layers, stay torch). Each level is timed in every kernel format
the runtime offers (:data:`spdy.kernels.FORMATS`: ``dense`` = torch's own
``nn.Linear``, ``csr``, ``bcsr1x4``, ``bcsr4x1``, and on more than one thread the same
sparse kernels on the calling thread alone, ``csr-1t`` etc.; :data:`spdy.kernels.CONV_FORMATS`
for Conv2d)
and the fastest is kept. Level 0 (unpruned) is timed in every format too, so the
dense baseline is the fastest way this runtime runs the unpruned layer.

To deploy with the profile's predictions, build each layer in the format the
profile records for its level (``profile.formats[layer][level]``), e.g.
``SparseLinear.from_linear(linear, format=fmt)``; ``sparsify(format="auto")`` uses a
fixed rule that may pick another format.

Torch and Numba share one OpenMP runtime only if :mod:`spdy.kernels` is imported
before torch (``spdy.profilers`` does so); the fingerprint records whether that worked.
"""

from __future__ import annotations

import logging
from typing import Any

from spdy.errors import InvalidInputError
from spdy.profilers.base import DENSE, LayerChoice, register
from spdy.profilers.torch_backends import TorchRuntimeBackend, dense_module
from spdy.types import LayerSpec

log = logging.getLogger(__name__)


@register
class SpdyCpuBackend(TorchRuntimeBackend):
    """The project's Numba sparse kernels inside a PyTorch model, fp32 on the CPU."""

    name = "spdy-cpu"
    description = "spdy's Numba sparse CPU kernels (spdy.runtime): dense, csr or bcsr4 per level, fastest kept"

    def __init__(self, threads: int | None = None, policy: Any = None) -> None:
        super().__init__(threads=threads, policy=policy, dtype="float32")
        from spdy import kernels

        secs = kernels.warmup()
        log.debug("spdy kernels ready in %.1f s (compile or cache load)", secs)
        status = kernels.openmp_status()
        self._shared_openmp = bool(status.get("shared", False))
        if self._shared_openmp:
            _limit_openmp_nesting()  # again: warm-up may have started Numba's pool
        if not self._shared_openmp:
            log.warning("torch and the spdy kernels use two OpenMP runtimes (%s): timings suffer. Import spdy "
                        "(or spdy.kernels) before torch.", status)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import spdy.runtime  # noqa: F401
        except ImportError as exc:
            return f"the spdy CPU kernels cannot be imported ({exc}); install spdy with its numba dependency"
        return None

    def _configure_threads(self) -> None:
        from spdy import kernels

        kernels.set_num_threads(self.threads)
        kernels.retain_freed_memory()  # as the runtime runs (spdy.apply(sparse=True))
        if kernels.openmp_status().get("shared"):
            _limit_openmp_nesting()

    def runtime_fingerprint(self) -> dict[str, Any]:
        import numba

        from spdy import kernels

        status = kernels.openmp_status()
        return {
            **super().runtime_fingerprint(),
            "numba_threads": int(numba.get_num_threads()),
            "numba_threading_layer": _threading_layer(),
            "openmp_shared": bool(status.get("shared", False)),
            "openmp_max_active_levels": _max_active_levels(),
            "kernel_formats": list(kernels.FORMATS),
            "allocator": kernels.allocator_status(),
        }

    def pool_of(self, fmt: str) -> str:
        """Dense layers run in torch's pool, the others in Numba's: unless spdy.kernels made them
        one OpenMP runtime, they are timed apart (see :meth:`Backend.pool_of`)."""
        if self._shared_openmp:
            return "default"
        return "torch" if fmt == DENSE else "numba"

    def layer_formats(self, spec: LayerSpec, sparsity: float) -> tuple[str, ...]:
        from spdy import kernels

        if spec.kind == "linear":
            out_f, in_f = spec.weight_shape
            # blocked formats need whole blocks: bcsr1x4 4 inputs, bcsr4x1 4 outputs; the serial
            # (-1t) formats are other formats only when the runtime has more than one thread
            return tuple(f for f in kernels.FORMATS
                         if not (f.startswith("bcsr1x4") and in_f % 4) and not (f.startswith("bcsr4x1") and out_f % 4)
                         and not (kernels.is_serial(f) and self.threads <= 1))
        if sparsity > 0:
            return tuple(kernels.CONV_FORMATS)
        return (DENSE,)

    def make_module(self, spec: LayerSpec, choice: LayerChoice) -> Any:
        from spdy import runtime

        base = dense_module(spec, choice)
        if choice.fmt == DENSE:
            return base  # the runtime keeps dense layers as the original torch module
        if spec.kind == "linear":
            if choice.fmt not in runtime.FORMATS:
                raise InvalidInputError(f"spdy-cpu has no Linear format {choice.fmt!r}; expected one of {runtime.FORMATS}")
            return runtime.SparseLinear.from_linear(base, format=choice.fmt).eval()
        if choice.fmt not in runtime.CONV_FORMATS:
            raise InvalidInputError(f"spdy-cpu has no Conv2d format {choice.fmt!r}; expected one of {runtime.CONV_FORMATS}")
        return runtime.SparseConv2d.from_conv(base, format=choice.fmt).eval()



def _libgomp() -> Any:
    import ctypes

    return ctypes.CDLL("libgomp.so.1")  # the copy already loaded (shared with torch by spdy.kernels)


def _max_active_levels() -> int | None:
    try:
        return int(_libgomp().omp_get_max_active_levels())
    except (OSError, AttributeError):
        return None


def _limit_openmp_nesting() -> bool:
    """See :func:`spdy.kernels.threads.limit_openmp_nesting` (the runtime applies it too)."""
    from spdy.kernels import limit_openmp_nesting

    return limit_openmp_nesting()


def _threading_layer() -> str:
    try:
        from spdy import kernels

        return str(kernels.threading_layer())
    except Exception:  # Numba raises ValueError before the first parallel call
        return "unknown"

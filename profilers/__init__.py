"""Latency profilers: per-layer, per-level times of a model on a target runtime.

Backends (``get_backend(name, threads=...)``): ``spdy-cpu`` (the project's sparse CPU
kernels), ``ort-cpu`` (ONNX Runtime CPU), ``torch-cuda`` (PyTorch on an NVIDIA GPU) and
``torch-cpu`` (PyTorch dense and CSR on the CPU). ``profile_model`` makes a
:class:`~spdy.profile.Profile`; ``validate`` checks it against end-to-end runs.
"""

try:  # before torch: lets torch and the spdy kernels share one OpenMP thread pool
    import spdy.kernels  # noqa: F401
except ImportError:  # pragma: no cover - numba missing; spdy-cpu then reports itself unavailable
    pass

from spdy.profilers.base import (  # noqa: E402
    DENSE,
    QUICK_POLICY,
    STANDIN,
    Backend,
    LayerChoice,
    LevelTiming,
    Timing,
    TimingPolicy,
    as_numpy,
    register,
)
from spdy.profilers.registry import available_backends, backend_names, get_backend  # noqa: E402
from spdy.profilers.plans import backend_plan  # noqa: E402
from spdy.profilers.profiler import (  # noqa: E402
    profile_model,
    signed_validation_error,
    state_probe_plans,
    state_shift,
    state_validation_errors,
    validate,
    validation_error,
)

__all__ = [
    "DENSE",
    "QUICK_POLICY",
    "STANDIN",
    "Backend",
    "LayerChoice",
    "LevelTiming",
    "Timing",
    "TimingPolicy",
    "as_numpy",
    "backend_plan",
    "available_backends",
    "backend_names",
    "get_backend",
    "profile_model",
    "register",
    "state_probe_plans",
    "state_shift",
    "state_validation_errors",
    "validate",
    "signed_validation_error",
    "validation_error",
]

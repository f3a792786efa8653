"""Latency profilers: per-layer, per-level times of a model on a target runtime.

Backends (``get_backend(name, threads=...)``): ``spdy-cpu`` (the project's sparse CPU
kernels), ``ort-cpu`` (ONNX Runtime CPU), ``torch-cuda`` (PyTorch on an NVIDIA GPU) and
``torch-cpu`` (PyTorch dense and CSR on the CPU). ``profile_model`` makes a
:class:`~spdy.profile.Profile`; ``validate`` checks it against end-to-end runs.
"""

from spdy.profilers.base import (
    DENSE,
    QUICK_POLICY,
    STANDIN,
    Backend,
    LayerChoice,
    LevelTiming,
    Timing,
    TimingPolicy,
    available_backends,
    backend_names,
    get_backend,
    register,
)
from spdy.profilers.profiler import profile_model, validate, validation_error

__all__ = [
    "DENSE",
    "QUICK_POLICY",
    "STANDIN",
    "Backend",
    "LayerChoice",
    "LevelTiming",
    "Timing",
    "TimingPolicy",
    "available_backends",
    "backend_names",
    "get_backend",
    "profile_model",
    "register",
    "validate",
    "validation_error",
]

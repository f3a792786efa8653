"""``spdy-cpu``: the project's own CPU sparse kernels (``spdy.runtime``), placeholder until they land."""

from __future__ import annotations

from spdy.profilers.torch_backends import TorchRuntimeBackend

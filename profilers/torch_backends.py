"""Backends whose runtime is PyTorch itself: ``torch-cpu`` and ``torch-cuda``.

Both share :class:`TorchRuntimeBackend`: a layer runs as the ``nn.Module`` the
runtime would install in the model (built by :meth:`TorchRuntimeBackend.make_module`),
and a model runs end to end with those modules swapped in by name. The base time
is the model with every prunable layer replaced by :class:`StandIn`, a module that
returns a preallocated output of the right shape (the dense layer's real output on
the example batch), so that ``T_base + sum(layer times)`` predicts the whole model.

``spdy-cpu`` (the project's kernels) builds on the same class in ``spdy_cpu.py``.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

# CsrLinear, SemiStructuredLinear, move_batch and set_submodule are the runtime's (spdy._modules);
# importable from here too, where they used to live
from spdy._modules import CsrLinear, SemiStructuredLinear, move_batch, set_submodule, swap_modules  # noqa: F401
from spdy.errors import InvalidInputError
from spdy.profilers.base import DENSE, STANDIN, Backend, LayerChoice, Runner, register
from spdy.types import LayerSpec

log = logging.getLogger(__name__)

#: compute dtypes of the torch backends (``dtype=``)
TORCH_DTYPES = ("float32", "float16", "bfloat16")


def inference_copy(model: Any, device: str = "cpu", dtype: Any = torch.float32) -> Any:
    """A copy of ``model`` on ``device`` in ``dtype``, in eval mode, without gradients. On the CPU in
    the model's own dtype the copy's parameters and buffers share the model's storage (its users
    only read them): each of the many runners a profile builds at once costs only the layers it
    swaps in, and the weights stay where the model's loader put them (a MiniLM loaded from its
    safetensors file keeps them in the file's mapping; torch.compile of a deep copy ran 1.5-3.3%
    slower than of the loaded model). The model's own tensors are untouched."""
    params, buffers = list(model.parameters()), list(model.buffers())
    if device == "cpu" and all(t.device.type == "cpu" and (t.dtype == dtype or not t.is_floating_point())
                               for t in params + buffers):
        memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False) for p in params}
        memo.update({id(b): b.detach() for b in buffers})
        return copy.deepcopy(model, memo).eval()
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval().requires_grad_(False)


class StandIn(torch.nn.Module):
    """Zero-cost stand-in for a prunable layer: returns a preallocated output.

    The output is the dense layer's real output on the example batch, so the rest
    of the model computes on realistic values. (A model that modifies a layer's
    output in place would corrupt it across calls; that changes values, not time.)
    """

    def __init__(self, out: torch.Tensor, accepts_epilogue: bool = False) -> None:
        super().__init__()
        self.out = out
        # standing in for a convolution, it takes the epilogue the convolution would take
        # (spdy.runtime.fuse_conv_epilogues), so that the base leaves out what the layer does
        self.accepts_epilogue = accepts_epilogue
        self.clamp: tuple[float, float] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.out


def capture_layer_io(model: Any, example: Any, forward: Any, names: list[str]) -> dict[str, tuple[Any, Any]]:
    """Run ``forward(model, example)`` once and return ``{name: (input, output)}`` of the named layers."""
    io: dict[str, tuple[Any, Any]] = {}
    handles = []
    for n in names:
        mod = model.get_submodule(n)

        def hook(_m: Any, inputs: tuple[Any, ...], output: Any, n: str = n) -> None:
            if n not in io:
                io[n] = (inputs[0].detach().clone(), output.detach().clone())

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            forward(model, example)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in io]
    if missing:
        raise InvalidInputError(f"layers {missing[:5]} did not run on the example batch")
    return io


class TorchRuntimeBackend(Backend):
    """A backend whose model runs in PyTorch, with prunable layers swapped for runtime modules."""

    device: str = "cpu"

    def __init__(self, threads: int | None = None, policy: Any = None, dtype: str = "float32") -> None:
        self.dtype_name = dtype
        super().__init__(threads=threads, policy=policy)
        self._io_cache: "weakref.WeakKeyDictionary[Any, dict[str, tuple[Any, Any]]]" = weakref.WeakKeyDictionary()

    @property
    def torch_dtype(self) -> Any:
        dt = getattr(torch, self.dtype_name, None)
        if not isinstance(dt, torch.dtype):
            raise InvalidInputError(f"unknown torch dtype {self.dtype_name!r}; use one of {', '.join(TORCH_DTYPES)}")
        return dt

    def _configure_threads(self) -> None:
        torch.set_num_threads(self.threads)

    def runtime_fingerprint(self) -> dict[str, Any]:
        return {"torch_threads": torch.get_num_threads(), "dtype": self.dtype_name,
                "torch_parallel": torch.__config__.parallel_info().splitlines()[-1].strip()}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "dtype": self.dtype_name, "device": self.device}

    # ------------------------------------------------------------------ to implement

    def make_module(self, spec: LayerSpec, choice: LayerChoice) -> Any:
        """The module the runtime installs for this layer in this format (on the backend's device)."""
        if choice.fmt != DENSE:
            raise InvalidInputError(f"backend {self.name!r} has no format {choice.fmt!r} for layer {spec.name!r}")
        return dense_module(spec, choice).to(device=self.device, dtype=self.torch_dtype)

    # ------------------------------------------------------------------ layers

    def _input(self, spec: LayerSpec, x: np.ndarray | Any | None) -> Any:
        if x is None:
            g = torch.Generator().manual_seed(0)
            t = torch.randn(spec.input_shape, generator=g)
        elif isinstance(x, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        else:
            t = x
        if tuple(t.shape) != tuple(spec.input_shape):
            raise InvalidInputError(f"layer {spec.name!r}: input has shape {tuple(t.shape)}; the spec says {spec.input_shape}")
        t = t.to(device=self.device, dtype=self.torch_dtype)
        return t.contiguous(memory_format=self._memory_format(spec, t))

    #: whether the runtime's convolutions take and give channels_last (spdy-cpu's SparseConv2d):
    #: a convolution's input alone, and a stand-in's output, are timed in that layout
    channels_last_convs = False

    def _memory_format(self, spec: LayerSpec | None, t: Any) -> Any:
        """The layout a tensor into or out of layer ``spec`` has in the models this backend runs."""
        if self.channels_last_convs and spec is not None and spec.kind == "conv2d" and t.dim() == 4:
            return torch.channels_last
        return torch.contiguous_format

    def layer_runner(self, spec: LayerSpec, choice: LayerChoice, x: np.ndarray | None = None) -> Runner:
        mod = self.make_module(spec, choice)
        inp = self._input(spec, x)

        def run() -> Any:
            return mod(inp)  # measure() runs it under torch.inference_mode(), entered once

        run.module = mod  # type: ignore[attr-defined]
        return run

    def timing_context(self) -> Any:
        return torch.inference_mode()

    # ------------------------------------------------------------------ models

    def _layer_io(self, bundle: Any, names: list[str]) -> dict[str, tuple[Any, Any]]:
        cached = self._io_cache.get(bundle.model)
        if cached is None or any(n not in cached for n in names):
            model = self._device_model(bundle.model)
            ex = move_batch(bundle.example, self.device, self.torch_dtype)
            cached = capture_layer_io(model, ex, bundle.forward, names)
            self._io_cache[bundle.model] = cached
        return cached

    def _device_model(self, model: Any) -> Any:
        """:func:`inference_copy` of ``model`` on the backend's device and dtype."""
        return inference_copy(model, self.device, self.torch_dtype)

    def model_runner(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> Runner:
        from spdy.models.base import discover_layers

        model = self._device_model(bundle.model)
        specs = {s.name: s for s in discover_layers(bundle.model, bundle.example, bundle.forward)} if choices else {}
        standins = [n for n, c in choices.items() if c.fmt == STANDIN]
        io = self._layer_io(bundle, standins) if standins else {}
        modules: dict[str, Any] = {}
        for name, choice in choices.items():
            spec = specs.get(name)
            if choice.fmt == STANDIN:
                out = io[name][1]
                modules[name] = StandIn(out.contiguous(memory_format=self._memory_format(spec, out)),
                                        accepts_epilogue=spec is not None and spec.kind == "conv2d")
                continue
            if spec is None:
                raise InvalidInputError(f"{name!r} is not a prunable layer of model {bundle.name!r}")
            modules[name] = self.make_module(spec, choice)
        swap_modules(model, modules)
        ex = move_batch(bundle.example, self.device, self.torch_dtype)
        fwd = bundle.forward

        def run() -> Any:
            with torch.inference_mode():
                return fwd(model, ex)

        run.model = model  # type: ignore[attr-defined]  # for tests and inspection
        return run


def dense_module(spec: LayerSpec, choice: LayerChoice) -> Any:
    """An ``nn.Linear`` / ``nn.Conv2d`` holding ``choice.weight`` (pruned, dense storage)."""
    if choice.weight is None:
        raise InvalidInputError(f"layer {spec.name!r}: format {choice.fmt!r} needs a weight")
    w = torch.from_numpy(np.ascontiguousarray(choice.weight, dtype=np.float32))
    b = None if choice.bias is None else torch.from_numpy(np.ascontiguousarray(choice.bias, dtype=np.float32))
    if spec.kind == "linear":
        mod = torch.nn.Linear(spec.weight_shape[1], spec.weight_shape[0], bias=b is not None)
    else:
        out_c, in_c, kh, kw = spec.weight_shape
        mod = torch.nn.Conv2d(in_c, out_c, (kh, kw), stride=spec.stride, padding=spec.padding,
                              dilation=spec.dilation, bias=b is not None)
    with torch.no_grad():
        mod.weight.copy_(w)
        if b is not None:
            mod.bias.copy_(b)
    return mod.eval().requires_grad_(False)


@register
class TorchCpuBackend(TorchRuntimeBackend):
    """PyTorch on the CPU: dense (MKL/oneDNN) or torch's CSR ``addmm`` per level. fp32."""

    name = "torch-cpu"
    description = "PyTorch CPU: dense Linear/Conv2d, or CSR sparse.addmm for Linear"

    def layer_formats(self, spec: LayerSpec, sparsity: float) -> tuple[str, ...]:
        if spec.kind == "linear" and sparsity > 0:
            return (DENSE, "csr")
        return (DENSE,)

    def make_module(self, spec: LayerSpec, choice: LayerChoice) -> Any:
        if choice.fmt == DENSE:
            return dense_module(spec, choice)
        if choice.fmt == "csr" and spec.kind == "linear":
            w = torch.from_numpy(np.ascontiguousarray(choice.weight, dtype=np.float32))
            b = None if choice.bias is None else torch.from_numpy(np.ascontiguousarray(choice.bias, dtype=np.float32))
            return CsrLinear(w, b).eval()
        raise InvalidInputError(f"backend {self.name!r} has no format {choice.fmt!r} for {spec.kind} layer {spec.name!r}")


_NO_KERNEL_LOGGED: set[str] = set()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


@register
class TorchCudaBackend(TorchRuntimeBackend):
    """PyTorch on an NVIDIA GPU, timed with CUDA events.

    Per grid level (unstructured weights) the fastest of dense and CSR. The 2:4
    semi-structured kernel (``to_sparse_semi_structured``) is its own choice, not a
    format of a grid level: a level's unstructured weight is not 2:4, so the runtime could
    not run it that way. Ask for it with ``patterns=("2:4",)`` (:meth:`pattern_formats`):
    Linear layers whose weight fits the kernel's blocks (see
    :func:`spdy.runtime_cuda.semi_structured_problem`), in float16 or bfloat16. torch has
    no 4:8 kernel (nor any N:M but 2:4 in half precision), so 4:8 is never a choice here.
    Default dtype float16.
    """

    name = "torch-cuda"
    description = "PyTorch CUDA: dense or CSR per level, 2:4 semi-structured as its own choice; CUDA events"
    device = "cuda"

    def __init__(self, threads: int | None = None, policy: Any = None, dtype: str = "float16") -> None:
        super().__init__(threads=threads, policy=policy, dtype=dtype)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import torch
        except ImportError:
            return "PyTorch is not installed; install a CUDA build of torch"
        if torch.version.cuda is None:
            return (f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch "
                    "and run on a machine with an NVIDIA GPU")
        if not torch.cuda.is_available():
            return "torch sees no CUDA device; run on a machine with an NVIDIA GPU and a working driver"
        return None

    def runtime_fingerprint(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(0)
        return {
            **super().runtime_fingerprint(),
            "gpu": props.name,
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda_runtime": torch.version.cuda,
            "nvidia_driver": _nvidia_driver(),
        }

    def layer_formats(self, spec: LayerSpec, sparsity: float) -> tuple[str, ...]:
        if spec.kind != "linear" or sparsity <= 0:
            return (DENSE,)
        return (DENSE, "csr")

    def pattern_formats(self, spec: LayerSpec, pattern: str) -> tuple[str, ...]:
        from spdy.runtime_cuda import SEMI_STRUCTURED, semi_structured_problem

        if pattern == SEMI_STRUCTURED:
            why = semi_structured_problem(spec.kind, spec.weight_shape, self.dtype_name)
            if why is None:
                return (SEMI_STRUCTURED,)
            log.debug("torch-cuda: no 2:4 kernel for layer %s: %s", spec.name, why)
            return ()
        if pattern not in _NO_KERNEL_LOGGED:
            _NO_KERNEL_LOGGED.add(pattern)
            log.info("torch-cuda has no %s kernel (torch's sparse tensor-core kernels run 2:4 only); "
                     "%s is not a choice on this backend", pattern, pattern)
        return ()

    def make_module(self, spec: LayerSpec, choice: LayerChoice) -> Any:
        dt = self.torch_dtype
        if choice.fmt == DENSE:
            return dense_module(spec, choice).to(device=self.device, dtype=dt)
        if spec.kind != "linear" or choice.weight is None:
            raise InvalidInputError(f"backend {self.name!r} has no format {choice.fmt!r} for {spec.kind} layer {spec.name!r}")
        b = None if choice.bias is None else torch.from_numpy(np.ascontiguousarray(choice.bias)).to(self.device, dt)
        if choice.fmt == "2:4":
            from spdy.runtime_cuda import check_nm

            check_nm(choice.weight, 2, 4, name=f"the weight of layer {spec.name!r}")
            w = np.ascontiguousarray(choice.weight, dtype=np.float32)
            return SemiStructuredLinear(torch.from_numpy(w).to(self.device, dt), b).eval()
        if choice.fmt == "csr":
            w = torch.from_numpy(np.ascontiguousarray(choice.weight, dtype=np.float32)).to(self.device, dt)
            return CsrLinear(w, b).eval()
        raise InvalidInputError(f"backend {self.name!r} has no format {choice.fmt!r}")

    def _sample(self, fn: Runner, inner: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner

"""``spdy-cpu``: the project's own CPU sparse kernels (:mod:`spdy.kernels` via :mod:`spdy.runtime`).

A pruned model runs in PyTorch with its prunable layers swapped for
:class:`spdy.runtime.SparseLinear` / :class:`spdy.runtime.SparseConv2d` (the rest of
the model, and dense layers, stay torch, except a Hugging Face model's attention and
exact GELUs, which run on spdy's kernels: :func:`spdy.runtime.fast_base`; the dense
reference, torch eager, keeps torch's own). Each level is timed in every kernel format
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

import functools
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from spdy.errors import InvalidInputError
from spdy.profilers.base import DENSE, STANDIN, LayerChoice, Runner, register
from spdy.profilers.torch_backends import StandIn, TorchRuntimeBackend, dense_module
from spdy.types import LayerSpec

BASE = {"attention": "spdy", "gelu": "spdy", "encoder": "spdy", "depthwise": "spdy", "ffn": "fused", "qkv": "fused",
        "attention_output": "fused", "conv_epilogue": "fused", "encoder_plan": "planned", "encoder_tiles": "tiled"}
"""What the spdy-cpu fingerprint records of the part of a model around its pruned layers: Hugging
Face models' attention, exact GELUs and depthwise convolutions (with the zero pad before and the
ReLU/ReLU6 after each, where they chain) run on spdy's kernels, and a BERT encoder's forward
without transformers' wrappers, its feed-forward fused where both projections are sparse and its
query, key and value projections one call where all three are, and the residual and LayerNorm after
its attention in the output projection's epilogue where that is sparse, those fused parts run from a
plan of their kernel calls (:class:`spdy.runtime.EncoderForward`), on the kernels' tile layout where
all of a layer's parts fuse
(:func:`spdy.runtime.fast_base`, :func:`spdy.runtime.ffn_pairs`, :func:`spdy.runtime.qkv_triples`,
:func:`spdy.runtime.out_singles`), and each convolution applies the residual add and the activation
that alone read its output as it writes it (:func:`spdy.runtime.fuse_conv_epilogues`)
in the models it times, torch in the dense reference. Profiles and results without a key were
timed with torch's for that part."""

log = logging.getLogger(__name__)


@register
class SpdyCpuBackend(TorchRuntimeBackend):
    """The project's Numba sparse kernels inside a PyTorch model, fp32 on the CPU."""

    name = "spdy-cpu"
    description = "spdy's Numba sparse CPU kernels (spdy.runtime): dense, csr or bcsr4 per level, fastest kept"

    channels_last_convs = True  # SparseConv2d takes and gives channels_last

    def __init__(self, threads: int | None = None, policy: Any = None) -> None:
        super().__init__(threads=threads, policy=policy, dtype="float32")
        from spdy import kernels

        self._depthwise: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()

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
            "conv_formats": list(kernels.CONV_FORMATS),
            "allocator": kernels.allocator_status(),
            **BASE,
        }

    def model_runner(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> Runner:
        """:meth:`TorchRuntimeBackend.model_runner`, with the attention, GELUs and depthwise
        convolutions on spdy's kernels (:func:`spdy.runtime.fast_base`, the pads and activations
        that chain with a depthwise convolution found by one run of the model) in every model spdy
        runs: the base, the dense plan and the pruned models. ``choices={}`` stays torch's own
        model, the dense reference."""
        run = super().model_runner(bundle, choices)
        if choices:
            from spdy import runtime

            # the chains depend on the model's structure, not on the choices: traced once per model
            fusions = self._depthwise.get(bundle.model)
            if fusions is None:
                fusions = self._depthwise[bundle.model] = runtime.find_depthwise(run.model, lambda _m: run())  # type: ignore[attr-defined]
            runtime.fast_base(run.model, depthwise=fusions)  # type: ignore[attr-defined]
        return run

    def fused_pairs(self, bundle: Any, specs: Sequence[LayerSpec]) -> list[tuple[int, int]]:
        """The feed-forward (up, down) projections of a BERT encoder, which the encoder's forward
        runs as one fused block where both are sparse (:func:`spdy.runtime.ffn_pairs`)."""
        if self.runtime_fingerprint().get("ffn") != "fused":
            return []
        from spdy import runtime

        index = {s.name: i for i, s in enumerate(specs)}
        return [(index[a], index[b]) for a, b in runtime.ffn_pairs(bundle.model) if a in index and b in index]

    def fusion_runners(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> tuple[Runner, Runner]:
        from spdy import runtime

        return self._on_and_off(bundle, choices, runtime.set_ffn_fusion)

    def _on_and_off(self, bundle: Any, choices: Mapping[str, LayerChoice],
                    switch: Callable[[Any, bool], int]) -> tuple[Runner, Runner]:
        """Two runners of the same plan: as the runtime runs it, and with ``switch`` turned off; both
        with the encoder run layer by layer (no :class:`spdy.runtime.EncoderForward` plan), whose
        saving comes only with every part of a layer fused and is measured apart
        (:meth:`plan_runners`)."""
        from spdy import runtime

        fused, alone = self.model_runner(bundle, choices), self.model_runner(bundle, choices)
        for run in (fused, alone):
            runtime.set_encoder_plan(run.model, False)  # type: ignore[attr-defined]
        switch(alone.model, False)  # type: ignore[attr-defined]
        return fused, alone

    def planned_layers(self, bundle: Any, specs: Sequence[LayerSpec]) -> list[tuple[int, ...]]:
        """The six projections (query, key, value, attention output, feed-forward up and down) of
        each BERT encoder layer, which the encoder runs from a plan of kernel calls where all its
        parts are fused (:class:`spdy.runtime.EncoderForward`)."""
        if self.runtime_fingerprint().get("encoder_plan") != "planned":
            return []
        from spdy import runtime

        index = {s.name: i for i, s in enumerate(specs)}
        out = []
        for (q, k, v), (o,), (up, down) in zip(runtime.qkv_triples(bundle.model), runtime.out_singles(bundle.model),
                                                runtime.ffn_pairs(bundle.model)):
            if all(n in index for n in (q, k, v, o, up, down)):
                out.append(tuple(index[n] for n in (q, k, v, o, up, down)))
        return out

    def plan_runners(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> tuple[Runner, Runner]:
        """Two runners of the same plan, every fusion on: the encoder from its plan of kernel calls,
        and layer by layer (:func:`spdy.runtime.set_encoder_plan`)."""
        from spdy import runtime

        planned, alone = self.model_runner(bundle, choices), self.model_runner(bundle, choices)
        runtime.set_encoder_plan(alone.model, False)  # type: ignore[attr-defined]
        return planned, alone

    def unfused_runner(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> Runner:
        from spdy import runtime

        run = self.model_runner(bundle, choices)
        model = getattr(run, "model", None)
        if model is not None:
            for switch in (runtime.set_ffn_fusion, runtime.set_qkv_fusion, runtime.set_out_fusion):
                switch(model, False)
        return run

    def fused_triples(self, bundle: Any, specs: Sequence[LayerSpec]) -> list[tuple[int, int, int]]:
        """The query, key and value projections of a BERT encoder's self-attentions, which the
        encoder's forward runs as one call where all three are sparse (:func:`spdy.runtime.qkv_triples`)."""
        if self.runtime_fingerprint().get("qkv") != "fused":
            return []
        from spdy import runtime

        index = {s.name: i for i, s in enumerate(specs)}
        return [(index[a], index[b], index[c]) for a, b, c in runtime.qkv_triples(bundle.model)
                if a in index and b in index and c in index]

    def triple_fusion_runners(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> tuple[Runner, Runner]:
        from spdy import runtime

        return self._on_and_off(bundle, choices, runtime.set_qkv_fusion)

    def fused_singles(self, bundle: Any, specs: Sequence[LayerSpec]) -> list[tuple[int]]:
        """The output projections of a BERT encoder's self-attentions, which the encoder's forward
        runs with the residual and the LayerNorm in their epilogue where they are sparse
        (:func:`spdy.runtime.out_singles`)."""
        if self.runtime_fingerprint().get("attention_output") != "fused":
            return []
        from spdy import runtime

        index = {s.name: i for i, s in enumerate(specs)}
        return [(index[a],) for (a,) in runtime.out_singles(bundle.model) if a in index]

    def single_fusion_runners(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> tuple[Runner, Runner]:
        from spdy import runtime

        return self._on_and_off(bundle, choices, runtime.set_out_fusion)

    def pool_of(self, fmt: str) -> str:
        """Dense layers (``dense``, ``dnnl``) run in torch's pool, the others in Numba's: unless spdy.kernels made them
        one OpenMP runtime, they are timed apart (see :meth:`Backend.pool_of`)."""
        if self._shared_openmp:
            return "default"
        return "torch" if fmt in (DENSE, "dnnl") else "numba"

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
        return tuple(f for f in kernels.CONV_FORMATS if f in (DENSE, "dnnl"))

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
        return runtime.SparseConv2d.from_conv(base, format=choice.fmt, input_shape=spec.input_shape).eval()



@register
class SpdyCompiledBackend(SpdyCpuBackend):
    """``spdy-cpu`` with the model compiled by ``torch.compile`` (:func:`spdy.runtime.compile`).

    The layers are the same kernels; everything around them (normalisation, activations,
    residual adds) runs as Inductor's fused C++ code instead of one torch op at a time, and a
    Hugging Face model's attention as spdy's kernel (the op ``spdy::attention``,
    :func:`spdy.runtime.fast_attention`). Each layer runs as the ``spdy::call`` op, as in the
    compiled model, so layer times include its dispatch.

    One model is compiled per process and model: every prunable layer becomes a slot (one
    ``spdy::call`` whose module is looked up when it runs), and each runner puts its modules
    into the slots before it runs. The base is the same graph with :class:`StandIn` modules
    in the slots. ``model_runner(bundle, {})`` is torch eager, unswapped and uncompiled: the
    dense reference a user compares with.
    """

    name = "spdy-cpu-compiled"
    description = "spdy-cpu with the rest of the model compiled by torch.compile (Inductor C++), layers as one op each"
    channels_last_convs = False  # Inductor picks the layouts; a layer runs as spdy::call on what it is given

    def __init__(self, threads: int | None = None, policy: Any = None) -> None:
        super().__init__(threads=threads, policy=policy)
        self._slot_models: "weakref.WeakKeyDictionary[Any, _SlotModel]" = weakref.WeakKeyDictionary()

    def runtime_fingerprint(self) -> dict[str, Any]:
        import torch._inductor.config as inductor_config

        return {**super().runtime_fingerprint(), "attention": "spdy", "gelu": "torch", "encoder": "torch",
                "depthwise": "torch", "ffn": "torch", "qkv": "torch", "attention_output": "torch", "conv_epilogue": "torch",
                "encoder_plan": "torch", "encoder_tiles": "torch", "compiled": "torch.compile inductor, static shapes", "inductor_cpp_threads": inductor_config.cpp.threads}

    def layer_runner(self, spec: LayerSpec, choice: LayerChoice, x: np.ndarray | None = None) -> Runner:
        import torch

        from spdy import runtime

        mod = self.make_module(spec, choice)
        inp = self._input(spec, x)
        if not isinstance(mod, (runtime.SparseLinear, runtime.SparseConv2d)):
            def run() -> Any:
                return mod(inp)
        else:
            handle, shape = mod._handle, mod._out_shape(inp)
            call = torch.ops.spdy.call

            def run() -> Any:
                return call(inp, handle, shape)  # the op the compiled model calls

        run.module = mod  # type: ignore[attr-defined]
        return run

    def model_runner(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> Runner:
        from spdy.models.base import discover_layers

        if not choices:
            return super().model_runner(bundle, choices)  # torch eager, the reference
        slots = self._slot_models.get(bundle.model)
        if slots is None:
            specs = discover_layers(bundle.model, bundle.example, bundle.forward)
            io = self._layer_io(bundle, [s.name for s in specs])
            slots = self._slot_models[bundle.model] = _SlotModel(
                self._device_model(bundle.model), {s.name: s for s in specs}, io, bundle)
        modules: dict[str, Any] = {}
        for name, choice in choices.items():
            spec = slots.specs.get(name)
            if spec is None:
                raise InvalidInputError(f"{name!r} is not a prunable layer of model {bundle.name!r}")
            modules[name] = (StandIn(slots.io[name][1]) if choice.fmt == STANDIN
                             else self.make_module(spec, choice))
        return slots.runner(modules)


class _SlotModel:
    """A model compiled once with a slot in place of each prunable layer (see :class:`SpdyCompiledBackend`)."""

    def __init__(self, model: Any, specs: Mapping[str, LayerSpec], io: Mapping[str, tuple[Any, Any]], bundle: Any) -> None:
        import torch

        from spdy import runtime
        from spdy.profilers.torch_backends import move_batch, swap_modules

        self.specs = dict(specs)
        self.io = io
        slot = _slot_class()
        self.slots = {n: slot(model.get_submodule(n), tuple(io[n][1].shape)) for n in specs}
        swap_modules(model, dict(self.slots))
        self.originals = {n: s.target for n, s in self.slots.items()}
        self.example = move_batch(bundle.example, "cpu", torch.float32)
        self.forward = bundle.forward
        self.model = model
        runtime.fast_attention(model)  # the attention as the op spdy::attention; GELU stays Inductor's
        self.compiled = runtime.compile(model)
        with torch.inference_mode():
            self.forward(self.compiled, self.example)  # compiles now, not inside a timing

    def runner(self, modules: Mapping[str, Any]) -> Runner:
        import torch

        assign = [(self.slots[n], modules.get(n, self.originals[n])) for n in self.slots]
        compiled, fwd, ex = self.compiled, self.forward, self.example

        def run() -> Any:
            for slot, mod in assign:
                slot.set_target(mod)
            with torch.inference_mode():
                return fwd(compiled, ex)

        run.model = self.model  # type: ignore[attr-defined]
        run.modules = dict(modules)  # type: ignore[attr-defined]
        return run


@functools.cache
def _slot_class() -> type:
    from spdy import runtime

    class Slot(runtime._Compilable):
        """One prunable layer of a :class:`_SlotModel`: runs whatever module :attr:`target` holds.

        The target is kept outside the module tree (not a submodule), so the compiled graph
        neither sees nor guards on it."""

        def __init__(self, target: Any, out_shape: tuple[int, ...]) -> None:
            super().__init__()
            self.set_target(target)
            self.out_shape = list(out_shape)

        def set_target(self, module: Any) -> None:
            object.__setattr__(self, "target", module)

        def _out_shape(self, x: Any) -> list[int]:
            return self.out_shape

        def _run(self, x: Any) -> Any:
            # in the contiguous layout spdy::call's fake kernel declares (a SparseConv2d gives channels last)
            return self.target(x).contiguous()

    return Slot


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

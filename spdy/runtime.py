"""Run pruned models on the sparse CPU kernels: drop-in ``nn.Module`` replacements.

>>> from spdy import runtime
>>> runtime.set_num_threads(2)                 # torch and Numba, one pool
>>> formats = runtime.sparsify(model)          # swaps pruned Linear/Conv2d in place
>>> with torch.inference_mode():
...     out = model(**inputs)

:class:`SparseLinear` and :class:`SparseConv2d` take and return torch tensors
(CPU, float32); the kernels read the input and write the output through
zero-copy numpy views. They are inference-only: they hold no parameters and
refuse inputs that require grad while autograd is on.

Import :mod:`spdy.runtime` (or :mod:`spdy.kernels`) *before* torch so that
torch and the kernels share one OpenMP thread pool; see
:func:`spdy.kernels.openmp_status`.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from spdy import kernels  # first: shares the OpenMP runtime before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.fx  # noqa: E402
from torch import nn  # noqa: E402

from spdy._modules import swap_modules  # noqa: E402 - also spdy.runtime.swap_modules
from spdy.errors import InvalidInputError  # noqa: E402
from spdy.kernels import (  # noqa: E402
    CONV_FORMATS,
    FORMATS,
    PreparedConv2d,
    PreparedLinear,
    choose_conv_format,
    choose_format,
    get_num_threads,
    openmp_status,
    prepare_conv2d,
    prepare_linear,
    set_num_threads,
)
from spdy.kernels import attention as kattn  # noqa: E402
from spdy.kernels import depthwise as kdw  # noqa: E402
from spdy.kernels.conv import dnnl_convolution  # noqa: E402
from spdy.kernels.activation import gelu  # noqa: E402
from spdy.kernels.depthwise import Padding  # noqa: E402
from spdy.kernels.encoder import EncoderPlan, LayerKernels  # noqa: E402
from spdy.kernels.ffn import ffn_into, fusable  # noqa: E402
from spdy.kernels.linear import sparse_into  # noqa: E402
from spdy.kernels.qkv import fusable as qkv_fusable  # noqa: E402
from spdy.kernels.qkv import qkv_into  # noqa: E402
from spdy.kernels.residual import fusable as residual_fusable  # noqa: E402
from spdy.kernels.residual import residual_into  # noqa: E402

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "CONV_FORMATS",
    "SparseLinear",
    "SparseConv2d",
    "sparsify",
    "swap_modules",
    "set_num_threads",
    "get_num_threads",
    "openmp_status",
    "layer_formats",
    "compile",
    "fast_attention",
    "fast_gelu",
    "fast_encoder",
    "EncoderForward",
    "fast_base",
    "fuse_conv_activations",
    "fuse_conv_epilogues",
    "GELU",
]


# ---------------------------------------------------------------------------- torch.compile
#
# Under torch.compile each sparse module is one call of the custom op ``spdy::call``, opaque
# to the compiler: the graph does not break at it, and Inductor fuses and compiles everything
# around it (attention, LayerNorm, GELU, residual adds). The op finds the module by an integer
# handle: a compiled graph holds no Python objects, and ``handle`` is a constant of the graph.

_CALLS: dict[int, "weakref.ref[Any]"] = {}
_HANDLES = itertools.count(1)


def _register_call(module: Any) -> int:
    """A handle under which ``spdy::call`` runs ``module._run`` (dropped with the module)."""
    handle = next(_HANDLES)
    _CALLS[handle] = weakref.ref(module)
    weakref.finalize(module, _CALLS.pop, handle, None)
    return handle


@torch.library.custom_op("spdy::call", mutates_args=())
def _call(x: torch.Tensor, handle: int, out_shape: Sequence[int]) -> torch.Tensor:
    ref = _CALLS.get(handle)
    module = ref() if ref is not None else None
    if module is None:
        raise InvalidInputError(f"spdy::call: no live sparse module has handle {handle}; the compiled model "
                                "outlived the modules it was compiled with. Compile the model again.")
    return module._run(x)


@_call.register_fake
def _call_fake(x: torch.Tensor, handle: int, out_shape: Sequence[int]) -> torch.Tensor:
    return x.new_empty(list(out_shape))


class _Compilable(nn.Module):
    """A module that runs as ``spdy::call`` under torch.compile and as ``_run`` otherwise
    (one with a dense torch weight, ``_dense_w``, runs torch's own op either way)."""

    _dense_w: torch.Tensor | None = None

    def __init__(self) -> None:
        super().__init__()
        self._handle = _register_call(self)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _out_shape(self, x: torch.Tensor) -> list[int]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a layer kept dense runs torch's own op, which the compiler sees and may fuse
        if torch.compiler.is_compiling() and self._dense_w is None:
            return torch.ops.spdy.call(x, self._handle, self._out_shape(x))
        return self._run(x)

    # a copy (deepcopy, pickle) is another module and gets its own handle
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_handle", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._handle = _register_call(self)


def _check_input(x: Any, module: str, contiguous: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{module} takes a torch.Tensor; got {type(x).__name__}")
    if x.device.type != "cpu":
        raise InvalidInputError(f"{module} runs on the CPU; got a tensor on {x.device}. Move it with .cpu().")
    if x.dtype != torch.float32:
        raise InvalidInputError(f"{module} takes float32 input; got {x.dtype}. Convert with .float().")
    if x.requires_grad and torch.is_grad_enabled():
        raise InvalidInputError(
            f"{module} is inference-only and got an input that requires grad; "
            "run the model under torch.inference_mode() or torch.no_grad()"
        )
    return x.detach().contiguous() if contiguous else x.detach()


class SparseLinear(_Compilable):
    """Inference-only ``nn.Linear`` on a prepared weight (:class:`spdy.kernels.PreparedLinear`).

    ``format`` is the kernel format in use; ``weight`` and ``bias`` rebuild
    dense tensors on demand (for inspection, not speed).
    """

    def __init__(self, prepared: PreparedLinear) -> None:
        super().__init__()
        if not isinstance(prepared, PreparedLinear):
            raise InvalidInputError(f"SparseLinear needs a PreparedLinear; got {type(prepared).__name__}")
        self.prepared = prepared
        self.in_features = prepared.in_features
        self.out_features = prepared.out_features
        self._dense_w = torch.from_numpy(prepared.dense) if prepared.format == "dense" else None
        self._dense_b = torch.from_numpy(prepared.bias) if prepared.has_bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "auto", tokens: int | None = None) -> SparseLinear:
        """Prepare ``linear``'s weight (zeros = pruned) in ``format`` (``"auto"`` or one of ``FORMATS``).

        ``tokens`` (rows of the input per call, if known) informs ``"auto"``.
        """
        if not isinstance(linear, nn.Linear):
            raise InvalidInputError(f"from_linear needs an nn.Linear; got {type(linear).__name__}")
        _check_weight(linear.weight, "Linear")
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(prepare_linear(linear.weight.detach(), bias, format=format, tokens=tokens))

    @property
    def format(self) -> str:
        return self.prepared.format

    @property
    def sparsity(self) -> float:
        return self.prepared.sparsity

    @property
    def weight(self) -> torch.Tensor:
        return torch.from_numpy(self.prepared.to_dense())

    @property
    def bias(self) -> torch.Tensor | None:
        return torch.from_numpy(self.prepared.bias.copy()) if self.prepared.has_bias else None

    def _out_shape(self, x: torch.Tensor) -> list[int]:
        return [*x.shape[:-1], self.out_features]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        p = self.prepared
        # the per-call path of a sparse format inside a model: an fp32, contiguous CPU activation
        # that needs no grad, checked in a few attribute reads, straight to the kernel
        if (p.sparse is not None and type(x) is torch.Tensor and x.dtype is torch.float32 and not x.requires_grad
                and x.device.type == "cpu" and x.is_contiguous() and x.dim() and x.shape[-1] == p.in_features
                and x.numel()):
            y = torch.empty(*x.shape[:-1], p.out_features, dtype=torch.float32)
            sparse_into(x.numpy().reshape(-1, p.in_features), y.numpy().reshape(-1, p.out_features), p)
            return y
        return self._run_checked(x)

    def _run_checked(self, x: torch.Tensor) -> torch.Tensor:
        """Any input: checked, made contiguous, and run in the module's format."""
        x = _check_input(x, "SparseLinear")
        if x.shape[-1:] != (self.in_features,):
            raise InvalidInputError(f"SparseLinear expects {self.in_features} input features; got shape {tuple(x.shape)}")
        if self._dense_w is not None:
            return torch.nn.functional.linear(x, self._dense_w, self._dense_b)
        if self.prepared.format == "dnnl":
            return kernels.dnnl_linear(x, self.prepared)
        y = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.float32)
        kernels.linear(x.numpy(), self.prepared, out=y.numpy())
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.prepared.has_bias}, format={self.format!r}, sparsity={self.sparsity:.3f}"
        )


class SparseConv2d(_Compilable):
    """Inference-only ``nn.Conv2d`` (zero padding) on a prepared weight (:class:`spdy.kernels.PreparedConv2d`)."""

    def __init__(self, prepared: PreparedConv2d) -> None:
        super().__init__()
        if not isinstance(prepared, PreparedConv2d):
            raise InvalidInputError(f"SparseConv2d needs a PreparedConv2d; got {type(prepared).__name__}")
        self.prepared = prepared
        self.in_channels = prepared.in_channels
        self.out_channels = prepared.out_channels
        self.kernel_size = prepared.kernel_size
        self.stride = prepared.stride
        self.padding = prepared.padding
        self.dilation = prepared.dilation
        self.groups = prepared.groups
        self._dense_w = torch.from_numpy(prepared.dense) if prepared.dense is not None else None
        self._dense_b = torch.from_numpy(prepared.bias) if prepared.has_bias else None
        self.clamp: tuple[float, float] | None = None  # the epilogue's clamp (fuse_conv_epilogues)

    accepts_epilogue = True
    """:func:`fuse_conv_epilogues` may hand this module the add and the activation after it."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, format: str = "auto", pixels: int | None = None,
                  input_shape: Sequence[int] | None = None) -> SparseConv2d:
        """Prepare ``conv``'s weight in ``format`` (``"auto"`` or one of ``CONV_FORMATS``).

        Only zero padding is supported; the sparse format needs ``groups == 1``.
        ``pixels`` (output pixels per image, if known) informs ``"auto"``; ``input_shape``
        (``[N, C, H, W]``, if known) the layout ``dnnl`` packs the weight in.
        """
        if not isinstance(conv, nn.Conv2d):
            raise InvalidInputError(f"from_conv needs an nn.Conv2d; got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise InvalidInputError(
                f"SparseConv2d supports padding_mode='zeros' only; got {conv.padding_mode!r}. Keep this layer dense."
            )
        _check_weight(conv.weight, "Conv2d")
        bias = conv.bias.detach() if conv.bias is not None else None
        return cls(
            prepare_conv2d(
                conv.weight.detach(), bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                groups=conv.groups, format=format, pixels=pixels,
                input_shape=None if input_shape is None else tuple(input_shape),
            )
        )

    @property
    def format(self) -> str:
        return self.prepared.format

    @property
    def sparsity(self) -> float:
        return self.prepared.sparsity

    def _out_shape(self, x: torch.Tensor) -> list[int]:
        Ho, Wo = self.prepared.output_size(x.shape[-2], x.shape[-1])
        return [*x.shape[:-3], self.out_channels, Ho, Wo]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of ``x``, then its epilogue: ``+ residual`` where given (the graph's add,
        handed over by :func:`fuse_conv_epilogues`) and the clamp of the activation it absorbed.
        A batch of images ([N, C, H, W]) is taken in channels_last (converted if it is not) and the
        output is channels_last, whatever the format."""
        if torch.compiler.is_compiling():
            # the compiler sees the add and the clamp as its own ops and fuses them into its code
            if self._dense_w is not None:
                y = torch.nn.functional.conv2d(x, self._dense_w, self._dense_b, self.stride, self.padding,
                                               self.dilation, self.groups)
            else:
                y = torch.ops.spdy.call(x, self._handle, self._out_shape(x))
            if residual is not None:
                y = y + residual
            return y if self.clamp is None else y.clamp(*self.clamp)
        if x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
            # channels last from the first convolution on: the layout oneDNN's convolutions give
            # and its depthwise ones run fastest in, so no layer of a CNN pays for a layout change
            x = x.contiguous(memory_format=torch.channels_last)
        return self._conv(x, residual, self.clamp)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        # ``spdy::call``'s body: the convolution alone, in the contiguous layout its fake kernel
        # declares (``dnnl`` and a channels-last input give channels last)
        return self._conv(x, None, None).contiguous()

    def _conv(self, x: torch.Tensor, residual: torch.Tensor | None, clamp: tuple[float, float] | None) -> torch.Tensor:
        # every format takes NCHW and channels_last inputs as they are, and gives the same layout
        # (oneDNN's convolutions give channels_last whatever they take)
        dense = self._dense_w is not None
        x = _check_input(x, "SparseConv2d", contiguous=False)
        last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)  # one channel or pixel: both
        if not dense and not last:
            x = x.contiguous()
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise InvalidInputError(f"SparseConv2d expects [N, {self.in_channels}, H, W]; got shape {tuple(x.shape)}")
        Ho, Wo = self.prepared.output_size(x.shape[-2], x.shape[-1])
        shape = (*x.shape[:-3], self.out_channels, Ho, Wo)
        late = None  # a residual the epilogue cannot take (another shape or dtype): added after
        if residual is not None:
            if residual.shape != shape or residual.dtype != torch.float32 or residual.device.type != "cpu":
                late, residual = residual, None
            elif not dense:
                residual = residual.contiguous(memory_format=torch.channels_last if last else torch.contiguous_format)
        finish, clamp = (clamp, None) if late is not None else (None, clamp)
        if dense:
            if x.dim() == 3:
                r4 = None if residual is None else residual.unsqueeze(0)
                y = kernels.torch_conv2d(x.unsqueeze(0), self.prepared, r4, clamp).squeeze(0)
            else:
                y = kernels.torch_conv2d(x, self.prepared, residual, clamp)
        elif last:  # the kernels on the [N, H, W, C] arrays under torch's channels_last strides
            nhwc = torch.empty(shape[0], Ho, Wo, self.out_channels, dtype=torch.float32)
            r = None if residual is None else residual.detach().permute(0, 2, 3, 1).numpy()
            kernels.conv2d(x.permute(0, 2, 3, 1).numpy(), self.prepared, out=nhwc.numpy(), residual=r, clamp=clamp,
                           channels_last=True)
            y = nhwc.permute(0, 3, 1, 2)
        else:
            y = torch.empty(shape, dtype=torch.float32)
            kernels.conv2d(x.numpy(), self.prepared, out=y.numpy(),
                           residual=None if residual is None else residual.detach().numpy(), clamp=clamp)
        if late is not None:
            y = y + late
            if finish is not None:
                y = y.clamp(*finish)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, format={self.format!r}, sparsity={self.sparsity:.3f}"
            + ("" if self.clamp is None else f", clamp={self.clamp}")
        )


def _check_weight(w: torch.Tensor, kind: str) -> None:
    if w.device.type != "cpu":
        raise InvalidInputError(f"{kind} weight is on {w.device}; the sparse runtime is CPU-only. Call model.cpu() first.")
    if not w.dtype.is_floating_point:
        raise InvalidInputError(f"{kind} weight has dtype {w.dtype}; expected a float dtype (it is converted to float32)")


def _swappable(module: nn.Module) -> bool:
    # exact types only: subclasses (e.g. MultiheadAttention's out_proj) are read
    # through .weight by their owners and must stay real nn.Linear modules
    return type(module) in (nn.Linear, nn.Conv2d)


def sparsify(
    model: nn.Module, names: list[str] | None = None, format: str = "auto", tokens: int | None = None
) -> dict[str, str]:
    """Swap the model's ``nn.Linear`` / ``nn.Conv2d`` layers for sparse modules, in place.

    ``names``: the layers to consider (as in ``model.named_modules()``);
    default: every ``nn.Linear`` and ``nn.Conv2d`` (exact types). ``format``:
    ``"auto"`` (per layer: :func:`spdy.kernels.choose_format`, which keeps a
    layer dense where dense is predicted faster) or one format for all.
    ``tokens``: rows per call of the Linear inputs (batch x sequence), if known;
    it informs ``"auto"`` (small token counts favour dense).

    Returns ``{layer name: format}`` for every layer considered; layers left as
    they were (``"dense"``) keep their original module. Convolutions with
    groups > 1 or non-zero padding modes stay dense under ``"auto"``.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"sparsify needs an nn.Module; got {type(model).__name__}")
    if format != "auto" and format not in FORMATS:
        raise InvalidInputError(f"unknown format {format!r}; expected 'auto' or one of {FORMATS}")
    modules = dict(model.named_modules())
    if names is None:
        targets = [n for n, m in modules.items() if _swappable(m)]
    else:
        if isinstance(names, str):
            raise InvalidInputError("names must be a list of layer names, not a single string")
        missing = [n for n in names if n not in modules]
        wrong = [n for n in names if n in modules and not isinstance(modules[n], (nn.Linear, nn.Conv2d))]
        if missing or wrong:
            valid = [n for n, m in modules.items() if _swappable(m)]
            raise InvalidInputError(
                f"sparsify: {missing + wrong} are not nn.Linear/nn.Conv2d layers of this model; "
                f"valid names include {valid[:8]}{' ...' if len(valid) > 8 else ''}"
            )
        targets = list(dict.fromkeys(names))

    chosen: dict[str, str] = {}
    replacement: dict[int, nn.Module] = {}
    swaps: dict[str, nn.Module] = {}
    for name in targets:
        m = modules[name]
        if id(m) in replacement:
            chosen[name] = replacement[id(m)].format  # type: ignore[union-attr]
            continue
        if isinstance(m, nn.Linear):
            _check_weight(m.weight, "Linear")
            w = m.weight.detach().float().numpy()
            fmt = choose_format(w, tokens) if format == "auto" else format
            if fmt == "dense" and format == "auto":
                chosen[name] = "dense"
                continue
            new: nn.Module = SparseLinear.from_linear(m, format=fmt)
        else:
            _check_weight(m.weight, "Conv2d")
            if format == "auto":
                fmt = "dense"
                if m.padding_mode == "zeros" and m.groups == 1:
                    fmt = choose_conv_format(m.weight.detach().float().numpy(), m.groups)
                if fmt == "dense":
                    chosen[name] = "dense"
                    continue
            else:
                fmt = format
                if fmt not in CONV_FORMATS:
                    raise InvalidInputError(f"layer {name!r} is a Conv2d; format {fmt!r} is not one of {CONV_FORMATS}")
            new = SparseConv2d.from_conv(m, format=fmt)
        replacement[id(m)] = swaps[name] = new
        chosen[name] = fmt

    swap_modules(model, swaps)  # every reference, a module shared under several names included
    counts = {f: sum(1 for v in chosen.values() if v == f) for f in sorted(set(chosen.values()))}
    log.info("sparsify: %d layers considered, formats %s", len(chosen), counts)
    return chosen


def compile(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile(model)`` (Inductor, static shapes) with every sparse module one opaque op.

    The part of the model that is not a sparse layer (attention, normalisation, activations,
    residual adds) is compiled by Inductor's C++ backend, and the sparse layers run spdy's
    kernels as they do eagerly. Compilation happens at the first call (seconds to a minute,
    cached on disk by torch for the next process) and again for each new input shape. Raises
    :class:`~spdy.errors.InvalidInputError` for what is not an ``nn.Module``; ``options`` go to
    ``torch.compile`` (e.g. ``fullgraph=True``).
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"compile needs an nn.Module; got {type(model).__name__}")
    options.setdefault("dynamic", False)
    return torch.compile(model, **options)


def layer_formats(model: nn.Module) -> dict[str, str]:
    """``{name: format}`` of the sparse modules currently in ``model``."""
    return {n: m.format for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}


# ---------------------------------------------------------------------------- attention
#
# Hugging Face models look their attention function up by name at every call
# (``config._attn_implementation`` in transformers' AttentionInterface), so a model is switched
# to spdy's kernel by registering it under ATTENTION and setting that name; the attention mask
# is built as for torch's SDPA. Calls the kernel cannot run (autograd, dropout, causal or
# per-head masks, head sizes not a multiple of 32, other dtypes) go to torch's SDPA.

ATTENTION = "spdy"
"""The name spdy's attention is registered under in transformers' AttentionInterface."""


def _sdpa_fallback() -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
    B, _, Tq, _ = query.shape
    return kattn.attention_unchecked(query, key, value, kattn.mask_bias(mask, B, Tq, key.shape[2]), scale)


@torch.library.custom_op("spdy::attention", mutates_args=())
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    return _attention(query, key, value, mask, scale)


@_attention_op.register_fake
def _attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    B, H, Tq, D = query.shape
    return query.new_empty((B, Tq, H, D))


def _hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature, on :func:`spdy.kernels.attention.attention`
    (under torch.compile, as the custom op ``spdy::attention``, opaque to the compiler; the
    checks trace without a graph break)."""
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", False))
    special = causal or kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None
    if not special and kattn.unsupported(query, key, value, attention_mask, dropout) is None:
        scale = query.shape[3] ** -0.5 if scaling is None else scaling
        if torch.compiler.is_compiling():
            return torch.ops.spdy.attention(query, key, value, attention_mask, scale), None
        return _attention(query, key, value, attention_mask, scale), None
    return _sdpa_fallback()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _hf_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def fast_attention(model: nn.Module) -> list[str]:
    """Run the attention of every Hugging Face model inside ``model`` on spdy's kernel, in place.

    Returns the names of the (sub)models switched (``""`` for ``model`` itself); an empty list
    when there is none (a model not from transformers, or one that cannot switch its attention
    implementation), and the model is left as it was. The switch is per model config: modules
    sharing it (e.g. the original of a copy made with ``copy.deepcopy``) are not affected.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"fast_attention needs an nn.Module; got {type(model).__name__}")
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    switched: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, PreTrainedModel) or any(name.startswith(s + ".") or s == "" for s in switched):
            continue
        if not m._can_set_attn_implementation():
            log.info("fast_attention: %s cannot switch its attention implementation; left on %s",
                     type(m).__name__, m.config._attn_implementation)
            continue
        _register_attention()
        m.set_attn_implementation(ATTENTION)
        if m.config._attn_implementation == ATTENTION:
            switched.append(name)
    log.debug("fast_attention: %d model(s) on spdy's attention kernel", len(switched))
    return switched


# ---------------------------------------------------------------------------- encoder forward

#: The modules a BERT layer must hold for :func:`fast_encoder`'s forward.
_BERT_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "attention.output.LayerNorm", "intermediate.dense", "intermediate.intermediate_act_fn",
               "output.dense", "output.LayerNorm")
#: Arguments of a Hugging Face encoder's forward that a plain inference call leaves at these values.
_INERT = {"position_ids": (None,), "inputs_embeds": (None,), "encoder_hidden_states": (None,),
          "encoder_attention_mask": (None,), "cache": (None,), "past_key_values": (None,), "use_cache": (None, False),
          "output_attentions": (None, False), "output_hidden_states": (None, False), "return_dict": (None, True)}


def _bert_encoder(m: nn.Module, attention: bool = True) -> bool:
    """Whether ``m`` is a transformers ``BertModel`` (an encoder, no cross-attention, no chunked
    feed-forward) on spdy's attention (unless ``attention`` is False: whatever its attention), each
    layer holding :data:`_BERT_PARTS`."""
    try:
        from transformers import BertModel
    except ImportError:
        return False
    cfg = getattr(m, "config", None)
    if (not isinstance(m, BertModel) or cfg is None or cfg.is_decoder or getattr(cfg, "add_cross_attention", False)
            or (attention and cfg._attn_implementation != ATTENTION)):
        return False
    for layer in m.encoder.layer:
        if getattr(layer, "chunk_size_feed_forward", 0) or getattr(layer, "add_cross_attention", False):
            return False
        try:
            for part in _BERT_PARTS:
                layer.get_submodule(part)
        except AttributeError:
            return False
        sa = layer.attention.self
        if not all(hasattr(sa, a) for a in ("num_attention_heads", "attention_head_size", "scaling")):
            return False
    return True


def _plain_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any, Any] | None:
    """``(input_ids, attention_mask, token_type_ids)`` of an encoder call that asks for nothing
    else (no embeddings given, no cache, no attentions or hidden states returned), else None."""
    if len(args) > 3:
        return None
    names = ("input_ids", "attention_mask", "token_type_ids")
    got = dict(zip(names, args))
    for k, v in kwargs.items():
        if k in names and k not in got:
            got[k] = v
        elif k not in _INERT or not any(v is x for x in _INERT[k]):
            return None
    ids, mask, types = got.get("input_ids"), got.get("attention_mask"), got.get("token_type_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.device.type != "cpu":
        return None
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        return None
    return ids, mask, types


def _bert_layer(layer: nn.Module, x: torch.Tensor, keep: torch.Tensor | None, bias: Any,
                fuse: bool = True, fuse_qkv: bool = True, fuse_out: bool = True) -> torch.Tensor:
    """One BERT layer, eval mode: self-attention, output projection, residual and LayerNorm, then
    the feed-forward with its residual and LayerNorm (transformers' BertLayer, minus its wrappers).
    ``fuse``: the feed-forward as one fused block where both projections are sparse
    (:func:`_fusable_ffn`). ``fuse_qkv``: the query, key and value projections as one call where
    all three are sparse (:func:`_fusable_qkv`), the attention reading its output in place.
    ``fuse_out``: the attention's output projection with the residual and the LayerNorm in its
    epilogue where it is sparse (:func:`_fusable_out`). Submodules are read with
    :func:`_children`: this is serial Python on every pass, which a second thread does not
    shorten."""
    B, T, _ = x.shape
    att, inter, out = _children(layer, "attention", "intermediate", "output")
    sa, ao = _children(att, "self", "output")
    query, key, value = _children(sa, "query", "key", "value")
    H, D = sa.num_attention_heads, sa.attention_head_size
    if fuse_qkv and _fusable_qkv(query, key, value, x, H * D, D) and kattn.mask_unsupported(keep, B, T, T) is None:
        pq, pk, pv = query.prepared, key.prepared, value.prepared
        qkv = np.empty(B * T * 3 * H * D, np.float32)
        qkv_into(x.numpy().reshape(-1, pq.in_features), qkv.reshape(-1, 3 * H * D), pq, pk, pv)
        a = kattn.attention_qkv_unchecked(qkv, B, T, H, D, bias, float(sa.scaling))
    else:
        a = _self_attention(sa, query, key, value, x, keep, bias)
    dense, norm_a = _children(ao, "dense", "LayerNorm")
    a = a.reshape(B, T, H * D)
    if fuse_out and _fusable_out(dense, a, x):
        p_out = dense.prepared
        y = torch.empty_like(x)
        norm = _layer_norm(norm_a, p_out.out_features)
        residual_into(a.numpy().reshape(-1, p_out.in_features), x.numpy().reshape(-1, p_out.out_features),
                      y.numpy().reshape(-1, p_out.out_features), p_out, norm)
        x = y if norm is not None else norm_a(y)
    else:
        x = norm_a(dense(a) + x)
    up, act = _children(inter, "dense", "intermediate_act_fn")
    down, ln = _children(out, "dense", "LayerNorm")
    if fuse and _fusable_ffn(up, act, down, x):
        p_up, p_down = up.prepared, down.prepared
        y = torch.empty_like(x)
        norm = _layer_norm(ln, p_down.out_features)
        ffn_into(x.numpy().reshape(-1, p_up.in_features), y.numpy().reshape(-1, p_down.out_features), p_up, p_down,
                 True, norm)
        return y if norm is not None else ln(y)
    return ln(down(act(up(x))) + x)


def _self_attention(sa: nn.Module, query: nn.Module, key: nn.Module, value: nn.Module, x: torch.Tensor,
                    keep: torch.Tensor | None, bias: Any) -> torch.Tensor:
    """A BERT self-attention ``sa`` with its projections run one by one: [B, T, H, D] (spdy's
    kernel where it takes the call, else torch's SDPA)."""
    B, T, _ = x.shape
    H, D = sa.num_attention_heads, sa.attention_head_size
    q = query(x).view(B, T, H, D).transpose(1, 2)
    k = key(x).view(B, T, H, D).transpose(1, 2)
    v = value(x).view(B, T, H, D).transpose(1, 2)
    if kattn.unsupported(q, k, v, keep) is None:
        return kattn.attention_unchecked(q, k, v, bias, float(sa.scaling))
    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=sa.scaling).transpose(1, 2)


def _children(m: nn.Module, *names: str) -> tuple[Any, ...]:
    """``m``'s attributes ``names``: submodules straight from its ``_modules`` dict (``getattr`` for
    anything else). ``nn.Module.__getattr__`` costs about a microsecond a hop on these machines, and
    a BERT layer's forward takes some twenty."""
    d = m._modules
    return tuple(d[n] if n in d else getattr(m, n) for n in names)


def _layer_norm(ln: nn.Module, width: int) -> tuple[Any, Any, float] | None:
    """(weight, bias, eps) of a LayerNorm over the last ``width`` features with fp32 weight and
    bias, as the fused block's epilogue takes them; None for any other module."""
    if type(ln) is not nn.LayerNorm or tuple(ln.normalized_shape) != (width,):
        return None
    p = ln._parameters
    w, b = p.get("weight"), p.get("bias")
    if w is None or b is None or w.dtype is not torch.float32 or b.dtype is not torch.float32:
        return None
    return w.detach().numpy(), b.detach().numpy(), float(ln.eps)


def _fusable_qkv(query: nn.Module, key: nn.Module, value: nn.Module, x: torch.Tensor, width: int,
                 head_dim: int) -> bool:
    """Whether a self-attention's projections can run as one call (:func:`spdy.kernels.qkv.qkv_into`)
    on ``x`` with the attention kernel reading the result in place: all three sparse Linears in a
    multithreaded sparse format, each ``width`` (heads x ``head_dim``, a multiple of 32) wide, and
    ``x`` a non-empty contiguous fp32 CPU tensor [batch, tokens, features] without grad."""
    return (_qkv_modules_fusable(query, key, value, width, head_dim)
            and x.dtype is torch.float32 and x.dim() == 3 and x.is_contiguous() and not x.requires_grad
            and x.numel() > 0 and x.shape[-1] == query.in_features)


def _qkv_modules_fusable(query: nn.Module, key: nn.Module, value: nn.Module, width: int, head_dim: int) -> bool:
    """The modules' half of :func:`_fusable_qkv`."""
    return (type(query) is SparseLinear and type(key) is SparseLinear and type(value) is SparseLinear
            and qkv_fusable(query.prepared, key.prepared, value.prepared)
            and query.out_features == key.out_features == value.out_features == width and head_dim % 32 == 0)


def _fusable_out(dense: nn.Module, a: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether an attention's output projection ``dense`` can run with the residual ``x`` in its
    epilogue (:func:`spdy.kernels.residual.residual_into`) on the attention output ``a``: a sparse
    Linear in a multithreaded sparse format, ``a`` and ``x`` contiguous fp32 CPU tensors without
    grad of the widths it reads and writes, with the same tokens."""
    return (type(dense) is SparseLinear and residual_fusable(dense.prepared)
            and a.dtype is torch.float32 and x.dtype is torch.float32 and a.is_contiguous() and x.is_contiguous()
            and not a.requires_grad and not x.requires_grad and a.numel() > 0
            and a.shape[-1] == dense.in_features and x.shape[-1] == dense.out_features
            and a.shape[:-1] == x.shape[:-1])


def _fusable_ffn(up: nn.Module, act: Any, down: nn.Module, x: torch.Tensor) -> bool:
    """Whether a feed-forward (``up`` projection, activation ``act``, ``down`` projection, residual)
    can run as one fused block (:func:`spdy.kernels.ffn.ffn_into`) on ``x``: both projections sparse
    Linears in a multithreaded sparse format, the activation the exact GELU, ``x`` a contiguous
    fp32 CPU tensor without grad, and the block's output as wide as its input."""
    return (_ffn_modules_fusable(up, act, down)
            and x.dtype is torch.float32 and x.is_contiguous() and not x.requires_grad and x.numel() > 0
            and x.shape[-1] == up.in_features)


def _ffn_modules_fusable(up: nn.Module, act: Any, down: nn.Module) -> bool:
    """The modules' half of :func:`_fusable_ffn`."""
    return (type(up) is SparseLinear and type(down) is SparseLinear and fusable(up.prepared, down.prepared)
            and _exact_gelu(act, spdy=True) and down.out_features == up.in_features)


def _encoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name prefix, layer)`` of every layer of each BERT encoder in ``model`` that
    :func:`fast_encoder` switches (or will switch, once on spdy's attention)."""
    out = []
    for name, m in model.named_modules():
        if _bert_encoder(m, attention=False):
            for k, layer in enumerate(m.encoder.layer):
                out.append((f"{name}.encoder.layer.{k}" if name else f"encoder.layer.{k}", layer))
    return out


def ffn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The (up, down) projection names of every BERT feed-forward in ``model`` that
    :class:`EncoderForward` runs fused when both are sparse (see :func:`_fusable_ffn`): the layers
    of each encoder :func:`fast_encoder` switches (or will switch, once on spdy's attention), with an
    exact GELU between."""
    return [(f"{pre}.intermediate.dense", f"{pre}.output.dense") for pre, layer in _encoder_layers(model)
            if _exact_gelu(layer.intermediate.intermediate_act_fn, spdy=True)]


def qkv_triples(model: nn.Module) -> list[tuple[str, str, str]]:
    """The (query, key, value) projection names of every BERT self-attention in ``model`` that
    :class:`EncoderForward` runs as one call when all three are sparse (see :func:`_fusable_qkv`):
    the layers of each encoder :func:`fast_encoder` switches (or will switch)."""
    return [(f"{pre}.attention.self.query", f"{pre}.attention.self.key", f"{pre}.attention.self.value")
            for pre, _layer in _encoder_layers(model)]


def out_singles(model: nn.Module) -> list[tuple[str]]:
    """The output projection name of every BERT self-attention in ``model`` that
    :class:`EncoderForward` runs with the residual and the LayerNorm in its epilogue when it is
    sparse (see :func:`_fusable_out`): the layers of each encoder :func:`fast_encoder` switches (or
    will switch), as one-layer groups."""
    return [(f"{pre}.attention.output.dense",) for pre, _layer in _encoder_layers(model)]


def set_out_fusion(model: nn.Module, enabled: bool) -> int:
    """Turn the attention output projections' residual-and-LayerNorm epilogue of every switched
    encoder in ``model`` on or off (on by default); returns how many encoders it set. Off, the
    projection runs on its own and torch adds and normalises, as a profile times it alone: the
    profiler measures what the epilogue saves this way."""
    return _set_encoders(model, "fuse_out", enabled)


def set_qkv_fusion(model: nn.Module, enabled: bool) -> int:
    """Turn the one-call query, key and value projections of every switched encoder in ``model`` on
    or off (on by default); returns how many encoders it set. Off, each projection runs on its own,
    as a profile times it alone: the profiler measures what the one call saves this way."""
    return _set_encoders(model, "fuse_qkv", enabled)


def set_encoder_plan(model: nn.Module, enabled: bool) -> int:
    """Run every switched encoder in ``model`` from a plan of its fused parts' kernel calls (on by
    default; see :class:`EncoderForward`) or, off, each layer through :func:`_bert_layer` as before
    the plans; returns how many encoders it set."""
    return _set_encoders(model, "planned", enabled)


def set_encoder_tiles(model: nn.Module, enabled: bool) -> int:
    """Run the layers whose parts all fuse on the kernels' tile layout (on by default; see
    :class:`EncoderForward`) or, off, each part from and to rows of tokens; returns how many
    encoders it set."""
    return _set_encoders(model, "tiled", enabled)


def set_ffn_fusion(model: nn.Module, enabled: bool) -> int:
    """Turn the fused feed-forward of every switched encoder in ``model`` on or off (it is on by
    default); returns how many encoders it set. Off, each projection runs on its own, as a profile
    times it alone: the profiler measures the fused block's saving this way."""
    return _set_encoders(model, "fuse_ffn", enabled)


def _set_encoders(model: nn.Module, switch: str, enabled: bool) -> int:
    """Set ``switch`` of every :class:`EncoderForward` in ``model``; returns how many."""
    n = 0
    for _name, m in model.named_modules():
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, EncoderForward):
            setattr(fwd, switch, bool(enabled))
            n += 1
    return n


class EncoderForward:
    """The forward of a Hugging Face BERT encoder switched by :func:`fast_encoder`.

    A plain inference call (token ids, attention mask, token types; eval mode, no autograd on the
    weights, not under torch.compile) runs the embeddings, turns the mask into the attention
    kernel's additive scores once, and runs each layer's modules directly (:func:`_bert_layer`):
    the same modules and kernels as the model's own forward, without its wrappers (decorators, mask
    machinery, six wrapper modules a layer), whose cost is serial Python on every pass. Where a
    layer's two feed-forward projections are both sparse, they run as one fused block with the
    GELU, the residual and the LayerNorm (:func:`spdy.kernels.ffn.ffn_into`) unless ``fuse_ffn`` is False
    (:func:`set_ffn_fusion`); where its query, key and value projections are all sparse, they run as
    one call (:func:`spdy.kernels.qkv.qkv_into`) unless ``fuse_qkv`` is False (:func:`set_qkv_fusion`);
    where its attention output projection is sparse, the residual and the LayerNorm run in that
    projection's epilogue (:func:`spdy.kernels.residual.residual_into`) unless ``fuse_out`` is False
    (:func:`set_out_fusion`).

    Where any of those fused parts runs, the encoder runs from a plan
    (:class:`spdy.kernels.encoder.EncoderPlan`, unless ``planned`` is False: :func:`set_encoder_plan`):
    the fused parts' kernel calls with their arguments and buffers made once per input shape and
    thread count, kept per calling thread, and made again when a module, weight or switch it was
    made from changes. The other parts run their modules as above. Layers whose parts all fuse pass
    their activations on in the kernels' tile layout, the attention included, unless ``tiled`` is
    False (:func:`set_encoder_tiles`); a run of such layers puts the hidden state into tiles once
    and takes it out once.
    Any other call runs the model's own forward.
    """

    #: plans kept per calling thread (one per input shape and thread count, the newest ones)
    PLANS = 2

    def __init__(self, model: nn.Module, fuse_ffn: bool = True, fuse_qkv: bool = True, fuse_out: bool = True,
                 planned: bool = True, tiled: bool = True) -> None:
        self.model = model
        self.fuse_ffn = fuse_ffn
        self.fuse_qkv = fuse_qkv
        self.fuse_out = fuse_out
        self.planned = planned
        self.tiled = tiled
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_local", None)  # plans hold buffers and are per thread: made again after a copy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        m = self.model
        call = _plain_call(args, kwargs)
        if (call is None or m.training or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and any(p.requires_grad for p in m.parameters()))):
            return type(m).forward(m, *args, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        ids, mask, types = call
        x = m.embeddings(input_ids=ids, token_type_ids=types)
        B, T = ids.shape
        keep = None if mask is None else mask.bool()[:, None, None, :]
        bias = kattn.mask_bias(keep, B, T, T)  # None when nothing is masked
        # older pickles lack the switches
        switches = (getattr(self, "fuse_ffn", True), getattr(self, "fuse_qkv", True), getattr(self, "fuse_out", True))
        plan = self._plan(x, keep, switches) if getattr(self, "planned", True) else None
        if plan is not None:
            x = _run_plan(plan, m.encoder.layer, x, keep, bias, switches)
        else:
            for layer in m.encoder.layer:
                x = _bert_layer(layer, x, keep, bias, *switches)
        pooled = m.pooler(x) if getattr(m, "pooler", None) is not None else None
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=x, pooler_output=pooled)

    def _plan(self, x: torch.Tensor, keep: torch.Tensor | None, switches: tuple[bool, bool, bool]
              ) -> EncoderPlan | None:
        """This thread's plan for ``x`` (made or made again when needed); None where no layer has a
        fused part, or the call is one the fused parts do not take."""
        B, T, W = x.shape if x.dim() == 3 else (0, 0, 0)
        if (not B or not T or x.dtype is not torch.float32 or not x.is_contiguous() or x.requires_grad
                or kattn.mask_unsupported(keep, B, T, T) is not None):
            return None
        local = self.__dict__.get("_local")
        if local is None:
            local = self._local = threading.local()
        plans = local.__dict__.setdefault("plans", {})
        tiled = bool(getattr(self, "tiled", True))
        key = (B, T, W, get_num_threads(), switches, tiled)
        got = plans.get(key)
        if got is not None and all(d.get(k) is o for d, k, o in got[1]):
            return got[0]
        plans.pop(key, None)
        while len(plans) >= self.PLANS:
            plans.pop(next(iter(plans)))
        got = plans[key] = _make_plan(self.model, B, T, W, key[3], switches, tiled)
        return got[0]


#: (a module's ``_modules``, ``_parameters`` or ``__dict__``, a name, the object it held): a plan is
#: made again when any of them no longer holds its object
_Dep = tuple[dict[str, Any], str, Any]


def _holds(m: Any, name: str) -> _Dep:
    """The dependency on ``m.name`` (a submodule, a parameter or an attribute)."""
    for d in (m.__dict__.get("_modules", {}), m.__dict__.get("_parameters", {}), m.__dict__):
        if name in d:
            return d, name, d[name]
    return m.__dict__, name, None


def _layer_kernels(layer: nn.Module, width: int, switches: tuple[bool, bool, bool]
                   ) -> tuple[LayerKernels, list[_Dep]]:
    """Which parts of a BERT layer run as fused kernel calls in a plan, and what that depends on."""
    fuse_ffn, fuse_qkv, fuse_out = switches
    att, inter, out = _children(layer, "attention", "intermediate", "output")
    sa, ao = _children(att, "self", "output")
    query, key, value = _children(sa, "query", "key", "value")
    dense, norm_a = _children(ao, "dense", "LayerNorm")
    up, act = _children(inter, "dense", "intermediate_act_fn")
    down, ln = _children(out, "dense", "LayerNorm")
    deps = [_holds(layer, "attention"), _holds(layer, "intermediate"), _holds(layer, "output"),
            _holds(att, "self"), _holds(att, "output"), _holds(ao, "dense"), _holds(ao, "LayerNorm"),
            _holds(inter, "dense"), _holds(inter, "intermediate_act_fn"), _holds(out, "dense"),
            _holds(out, "LayerNorm")]
    deps += [_holds(sa, n) for n in ("query", "key", "value", "num_attention_heads", "attention_head_size", "scaling")]
    deps += [_holds(mod, "prepared") for mod in (query, key, value, dense, up, down) if type(mod) is SparseLinear]
    deps += [_holds(n, a) for n in (norm_a, ln) for a in ("weight", "bias", "eps", "normalized_shape")]
    H, D = sa.num_attention_heads, sa.attention_head_size
    qkv = None
    if fuse_qkv and _qkv_modules_fusable(query, key, value, H * D, D) and query.in_features == width:
        qkv = (query.prepared, key.prepared, value.prepared)
    out_part = None
    norm = _layer_norm(norm_a, width)
    if (fuse_out and norm is not None and type(dense) is SparseLinear and residual_fusable(dense.prepared)
            and dense.out_features == width):
        out_part = (dense.prepared, norm)
    ffn = None
    norm = _layer_norm(ln, width)
    if fuse_ffn and norm is not None and _ffn_modules_fusable(up, act, down) and up.in_features == width:
        ffn = (up.prepared, down.prepared, norm)
    return LayerKernels(qkv, H, D, float(sa.scaling), out_part, ffn), deps


def _make_plan(m: nn.Module, B: int, T: int, W: int, nthreads: int, switches: tuple[bool, bool, bool],
               tiled: bool = True) -> tuple[EncoderPlan | None, list[_Dep]]:
    """The plan of encoder ``m`` for ``B`` sequences of ``T`` tokens ``W`` wide (None where no
    layer has a fused part; ``tiled``: see :class:`EncoderPlan`), and what it depends on."""
    layers = m.encoder.layer
    n = len(layers)
    deps = [_holds(m, "encoder"), _holds(m.encoder, "layer"), (layers._modules, str(n), None)]
    deps += [_holds(layers, str(i)) for i in range(n)]
    parts = []
    for layer in layers:
        lk, d = _layer_kernels(layer, W, switches)
        parts.append(lk)
        deps += d
    if not any(lk.any for lk in parts):
        return None, deps
    return EncoderPlan(parts, B, T, W, nthreads, tiled=tiled), deps


def _run_plan(plan: EncoderPlan, layers: Sequence[nn.Module], x: torch.Tensor, keep: torch.Tensor | None,
              bias: np.ndarray | None, switches: tuple[bool, bool, bool]) -> torch.Tensor:
    """The encoder's layers from ``plan`` on the embeddings ``x``: each fused part one kernel call on
    the plan's buffers, each other part its modules (a layer without fused parts: :func:`_bert_layer`)."""
    B, T, W = x.shape
    if plan.tiles_layer(0):  # straight from the embeddings into tiles (a contiguous fp32 tensor: _plan checks)
        plan.pack_input(0, x.reshape(-1).numpy())
    else:
        torch.from_numpy(plan.input_of(0)).copy_(x.reshape(-1))
    # each key's score (the mask is the same for every query): what the tiled attention takes
    key_bias = None if bias is None or not plan.tiled else np.ascontiguousarray(bias.reshape(B, T, -1)[:, 0]).reshape(-1)
    in_tiles = plan.tiles_layer(0)
    for i, (lk, layer) in enumerate(zip(plan.layers, layers)):
        if plan.tiles_layer(i):
            if not in_tiles:
                plan.pack_input(i)
                in_tiles = True
            plan.tiled_layer(i, key_bias)
            continue
        if in_tiles:
            plan.unpack_output(i - 1)
            in_tiles = False
        if not lk.any:
            y = _bert_layer(layer, torch.from_numpy(plan.input_of(i)).view(B, T, W), keep, bias, *switches)
            torch.from_numpy(plan.output_of(i)).copy_(y.reshape(-1))
            continue
        if lk.all:  # the common case, without a tensor or a module lookup
            plan.attention(i, bias)
            plan.attention_output(i)
            plan.feed_forward(i)
            continue
        x_t = torch.from_numpy(plan.input_of(i)).view(B, T, W)
        att, inter, out = _children(layer, "attention", "intermediate", "output")
        if lk.qkv is not None:
            plan.attention(i, bias)
            a = torch.from_numpy(plan.attention_out[: B * T * lk.heads * lk.head_dim]).view(B, T, -1)
        else:
            sa = _children(att, "self")[0]
            a = _self_attention(sa, *_children(sa, "query", "key", "value"), x_t, keep, bias).reshape(B, T, -1)
            if lk.out is not None:
                torch.from_numpy(plan.attention_out[: a.numel()]).copy_(a.reshape(-1))
        if lk.out is not None:
            plan.attention_output(i)
            h = torch.from_numpy(plan.block_out).view(B, T, W)
        else:
            dense, norm_a = _children(_children(att, "output")[0], "dense", "LayerNorm")
            h = norm_a(dense(a) + x_t)
            if lk.ffn is not None:
                torch.from_numpy(plan.block_out).copy_(h.reshape(-1))
        if lk.ffn is not None:
            plan.feed_forward(i)
        else:
            up, act = _children(inter, "dense", "intermediate_act_fn")
            down, ln = _children(out, "dense", "LayerNorm")
            torch.from_numpy(plan.output_of(i)).copy_(ln(down(act(up(h))) + h).reshape(-1))
    if in_tiles:  # straight out of the tiles into the pass's own output
        out = np.empty(B * T * W, np.float32)
        plan.unpack_output(len(plan.layers) - 1, out)
        return torch.from_numpy(out).view(B, T, W)
    return torch.from_numpy(plan.output_of(len(plan.layers) - 1).copy()).view(B, T, W)


def fast_encoder(model: nn.Module) -> list[str]:
    """Run every transformers ``BertModel`` inside ``model`` that is on spdy's attention
    (:func:`fast_attention`) with :class:`EncoderForward`, in place; returns their names (``""``
    for ``model`` itself). Module names, weights and outputs stay the same (the layers run the
    same modules); calls it does not cover go to the model's own forward."""
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"fast_encoder needs an nn.Module; got {type(model).__name__}")
    switched = []
    for name, m in model.named_modules():
        if _bert_encoder(m):
            if not isinstance(m.__dict__.get("forward"), EncoderForward):
                m.forward = EncoderForward(m)
            switched.append(name)
    log.debug("fast_encoder: %d encoder(s) switched", len(switched))
    return switched


# ---------------------------------------------------------------------------- GELU


class GELU(nn.Module):
    """The exact GELU, ``x * (1 + erf(x / sqrt 2)) / 2``, on spdy's vector kernel
    (:func:`spdy.kernels.activation.gelu`) for float32 CPU inputs without autograd; anything
    else, and any call under torch.compile, goes to :func:`torch.nn.functional.gelu`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under torch.compile, torch's own: the compiler fuses it with its neighbours
        if (not torch.compiler.is_compiling() and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (x.requires_grad and torch.is_grad_enabled())):
            return gelu(x)
        return nn.functional.gelu(x)


def _exact_gelu(module: nn.Module, spdy: bool = False) -> bool:
    """Whether ``module`` is torch's or transformers' exact GELU (or, with ``spdy``, spdy's :class:`GELU`)."""
    if spdy and type(module) is GELU:
        return True
    if type(module) is nn.GELU:
        return module.approximate == "none"
    try:
        from transformers.activations import GELUActivation
    except ImportError:
        return False
    return type(module) is GELUActivation and getattr(module, "act", None) is nn.functional.gelu


def fast_gelu(model: nn.Module) -> list[str]:
    """Swap every exact-GELU module of ``model`` (``nn.GELU()`` and transformers' ``GELUActivation``)
    for :class:`GELU`, in place; returns their names (empty when there is none)."""
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"fast_gelu needs an nn.Module; got {type(model).__name__}")
    names = [n for n, m in model.named_modules() if n and _exact_gelu(m)]
    swap_modules(model, {n: GELU() for n in names})
    return names


# ---------------------------------------------------------------------------- depthwise convolutions

@dataclass(frozen=True)
class DepthwiseFusion:
    """A depthwise convolution (module name ``conv``) with the zero pad before it (``pad``) and
    the activation after it (``act``) that :class:`DepthwiseConv2d` runs in one kernel call."""

    conv: str
    pad: str | None = None
    act: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"conv": self.conv, "pad": self.pad, "act": self.act}

    @classmethod
    def from_json(cls, obj: Any) -> DepthwiseFusion:
        if not isinstance(obj, dict) or not isinstance(obj.get("conv"), str) or \
                not all(isinstance(obj.get(k), (str, type(None))) for k in ("pad", "act")):
            raise InvalidInputError(f"a depthwise fusion is {{'conv': name, 'pad': name or null, 'act': name or null}}; "
                                    f"got {obj!r}")
        return cls(obj["conv"], obj.get("pad"), obj.get("act"))


def is_depthwise(module: nn.Module) -> bool:
    """An ``nn.Conv2d`` with one filter per input channel that :class:`DepthwiseConv2d` can run
    (zero padding given as numbers, no dilation, strides 1-4)."""
    return (type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and tuple(module.dilation) == (1, 1) and 1 <= min(module.stride) and max(module.stride) <= 4)


def _zero_pad(module: nn.Module) -> Padding | None:
    """The padding of an ``nn.ZeroPad2d`` (or an ``nn.ConstantPad2d`` of zeros); None for anything else."""
    if type(module) is nn.ZeroPad2d or (type(module) is nn.ConstantPad2d and module.value == 0):
        left, right, top, bottom = module.padding
        if min(left, right, top, bottom) >= 0:
            return Padding(top, bottom, left, right)
    return None


def _clamp_of(module: nn.Module) -> tuple[float, float] | None:
    """The output range of a ReLU, ReLU6 or Hardtanh module; None for anything else."""
    if type(module) is nn.ReLU:
        return (0.0, math.inf)
    if type(module) in (nn.ReLU6, nn.Hardtanh):
        return (float(module.min_val), float(module.max_val))
    return None


class DepthwiseConv2d(nn.Module):
    """A depthwise ``nn.Conv2d`` with an optional zero pad before it and clamp after it, run by
    :func:`spdy.kernels.depthwise.depthwise_conv2d` for float32 CPU inputs without autograd
    (anything else, and any call under torch.compile, goes to torch: pad, convolution, clamp).
    For inference: the convolution's parameters stop requiring grad, and the kernel's layout of
    the weight is made here, once (change ``conv.weight`` afterwards and build a new module)."""

    def __init__(self, conv: nn.Conv2d, pad: Padding = Padding(), clamp: tuple[float, float] | None = None) -> None:
        super().__init__()
        if not is_depthwise(conv):
            raise InvalidInputError(f"DepthwiseConv2d takes a depthwise nn.Conv2d (groups = in = out channels, "
                                    f"numeric zero padding, no dilation, stride 1-4); got {conv}")
        for p in conv.parameters():
            p.requires_grad_(False)  # an inference module: the kernel tracks no gradient
        self.conv = conv
        self.extra = pad
        self.padding = pad + Padding.symmetric(*conv.padding)
        self.clamp = clamp
        self._grouped = kdw.grouped_weight(conv.weight)  # the kernel's weight layout, made once

    def extra_repr(self) -> str:
        return f"padding={self.padding}, clamp={self.clamp}"

    def _dnnl(self, x: torch.Tensor) -> torch.Tensor:
        """A channels_last input (what oneDNN's convolutions give, :func:`fuse_conv_epilogues`'s
        ``dnnl`` layers) runs on oneDNN's depthwise convolution in that layout, the clamp fused.

        oneDNN's call takes one padding per dimension. A padding wider on one side (TensorFlow's
        ``SAME`` for a strided convolution) is made symmetric at the wider side's width, and the
        kernel grows by zero taps on the narrower side, the difference: output pixel ``i`` then
        reads the same input pixels with the same weights, and the output keeps its size. A copy
        of the input with the extra pad cost several times the convolution in channels_last."""
        p = self.padding
        sym = (max(p.top, p.bottom), max(p.left, p.right))
        conv = self.conv
        key = (tuple(x.shape), sym)
        packed = self.__dict__.get("_dnnl_weight")
        if packed is None or packed[0] != key:
            w = nn.functional.pad(conv.weight.detach(),
                                  [sym[1] - p.left, sym[1] - p.right, sym[0] - p.top, sym[0] - p.bottom])
            w = torch.ops.mkldnn._reorder_convolution_weight(w, list(sym), list(conv.stride), [1, 1],
                                                             conv.groups, list(x.shape))
            packed = self.__dict__["_dnnl_weight"] = (key, w)
        bias = None if conv.bias is None else conv.bias.detach()
        return dnnl_convolution(x, packed[1], bias, sym, conv.stride, (1, 1), conv.groups, clamp=self.clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        if not torch.compiler.is_compiling() and kdw.unsupported(x, w, self.conv.stride) is None:
            if kernels.DNNL and x.dim() == 4 and not x.is_contiguous() and \
                    x.is_contiguous(memory_format=torch.channels_last):
                return self._dnnl(x)
            return kdw.depthwise_unchecked(x, w, self.conv.bias, self.conv.stride, self.padding, self.clamp,
                                           self._grouped)
        p = self.extra
        if p != Padding():
            x = nn.functional.pad(x, [p.left, p.right, p.top, p.bottom])
        y = self.conv(x)
        return y if self.clamp is None else y.clamp(*self.clamp)


def find_depthwise(model: nn.Module, run: Callable[[nn.Module], Any]) -> tuple[DepthwiseFusion, ...]:
    """The depthwise convolutions of ``model`` (:func:`is_depthwise`), each with the zero-pad
    module that feeds it alone and the ReLU/ReLU6/Hardtanh module that alone reads its output,
    where one call of ``run(model)`` (a forward pass) shows such a chain (:func:`spdy.fold.find_chains`);
    then the other convolutions (an ``nn.Conv2d`` of one group, or a layer that accepts an
    epilogue: :class:`SparseConv2d`) that such an activation alone reads, with it (no pad), for
    :func:`fuse_conv_activations`."""
    from spdy.fold import find_chains

    modules = dict(model.named_modules())
    convs = {n: m for n, m in modules.items() if n and is_depthwise(m)}
    plain = {n: m for n, m in modules.items() if n and n not in convs and _takes_activation(m)}
    if not convs and not plain:
        return ()
    pads = {n: m for n, m in modules.items() if n and _zero_pad(m) is not None}
    acts = {n: m for n, m in modules.items() if n and _clamp_of(m) is not None}
    pad_of = {c.second: c.first for c in find_chains(model, run, pads, convs)}
    act_of = {c.first: c.second for c in find_chains(model, run, {**convs, **plain}, acts)}
    return (*(DepthwiseFusion(n, pad_of.get(n), act_of.get(n)) for n in convs),
            *(DepthwiseFusion(n, None, act_of[n]) for n in plain if n in act_of))


def _takes_activation(module: nn.Module) -> bool:
    """A convolution whose activation :func:`fuse_conv_activations` can hand it: a layer that
    accepts an epilogue, or an ``nn.Conv2d`` of one group (what spdy swaps for one)."""
    return bool(getattr(module, "accepts_epilogue", False)) or \
        (type(module) is nn.Conv2d and module.groups == 1 and not is_depthwise(module))


def fuse_conv_activations(model: nn.Module, fusions: Sequence[DepthwiseFusion]) -> list[str]:
    """Hand each convolution of ``fusions`` that is not depthwise (from :func:`find_depthwise`) the
    activation that alone reads its output, in place; returns the names of those that took one.

    For the convolutions :func:`fuse_conv_epilogues` cannot reach (a model's forward that does not
    trace calls them: the stem and head of most CNNs). Run it after that function: a convolution
    with an activation already (:attr:`SparseConv2d.clamp`) is left as it is, and one still an
    ``nn.Conv2d`` (not swapped for a layer that accepts an epilogue) too."""
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"fuse_conv_activations needs an nn.Module; got {type(model).__name__}")
    modules = dict(model.named_modules())
    swaps: dict[str, nn.Module] = {}
    for f in fusions:
        conv = modules.get(f.conv)
        clamp = _clamp_of(modules[f.act]) if f.act in modules else None
        if clamp is None or not getattr(conv, "accepts_epilogue", False) or getattr(conv, "clamp", None) is not None:
            continue  # no activation, a convolution that takes none (torch's, a depthwise one), or one taken
        conv.clamp = clamp  # type: ignore[assignment]
        swaps[f.act] = nn.Identity()
    swap_modules(model, swaps)
    return [f.conv for f in fusions if f.act in swaps]


def fast_depthwise(model: nn.Module, fusions: Sequence[DepthwiseFusion] | None = None) -> list[str]:
    """Swap depthwise convolutions for :class:`DepthwiseConv2d`, in place; returns their names.

    ``fusions`` (from :func:`find_depthwise`) name the convolutions with the pad and activation
    modules each absorbs (those become ``nn.Identity``); None: every depthwise convolution of
    ``model``, alone."""
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"fast_depthwise needs an nn.Module; got {type(model).__name__}")
    if fusions is None:
        fusions = [DepthwiseFusion(n) for n, m in model.named_modules() if n and is_depthwise(m)]
    modules = dict(model.named_modules())
    # the other convolutions' activations are fuse_conv_activations' (after fuse_conv_epilogues)
    fusions = [f for f in fusions if not (f.conv in modules and _takes_activation(modules[f.conv]))]
    swaps: dict[str, nn.Module] = {}
    for f in fusions:
        conv = modules.get(f.conv)
        pad = _zero_pad(modules[f.pad]) if f.pad in modules else None
        clamp = _clamp_of(modules[f.act]) if f.act in modules else None
        if conv is None or not is_depthwise(conv) or (f.pad is not None and pad is None) or \
                (f.act is not None and clamp is None):
            raise InvalidInputError(f"cannot fuse {f}: the model has no such depthwise convolution, zero pad and "
                                    "activation (were the fusions found on another model?)")
        swaps[f.conv] = DepthwiseConv2d(conv, pad or Padding(), clamp)
        swaps.update({n: nn.Identity() for n in (f.pad, f.act) if n is not None})
    swap_modules(model, swaps)
    return [f.conv for f in fusions]


# ---------------------------------------------------------------------------- conv epilogues
#
# A convolution's output is most often read by one add (a residual block's skip) and one
# activation, each a pass over a tensor as large as the output. fuse_conv_epilogues hands both
# to the convolution, whose kernels apply them as they write the output: the model's forward
# is rewritten with torch.fx where it can be traced symbolically.

_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {torch.relu, torch.relu_, nn.functional.relu}


def _fx_clamp(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[float, float] | None:
    """The output range of an activation node of a graph (a ReLU, ReLU6, Hardtanh or a clamp to
    constants, as a module, function or method) whose input is its first argument; else None."""
    args, kwargs = node.args, node.kwargs
    if node.op == "call_module":
        return _clamp_of(modules[str(node.target)])
    if node.op == "call_function":
        if node.target in _RELUS:
            return (0.0, math.inf)
        if node.target is nn.functional.relu6:
            return (0.0, 6.0)
        if node.target is nn.functional.hardtanh:
            lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            return _clamp_bounds((lo, hi), {})
        if node.target is torch.clamp:
            return _clamp_bounds(args[1:], kwargs)
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return (0.0, math.inf)
        if node.target in ("clamp", "clamp_"):
            return _clamp_bounds(args[1:], kwargs)
    return None


def _clamp_bounds(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[float, float] | None:
    lo = args[0] if len(args) > 0 else kwargs.get("min")
    hi = args[1] if len(args) > 1 else kwargs.get("max")
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in (lo, hi)):
        return None
    if lo is None and hi is None:
        return None
    lo = -math.inf if lo is None else float(lo)
    hi = math.inf if hi is None else float(hi)
    return (lo, hi) if lo <= hi else None


def _fx_residual(node: torch.fx.Node, x: torch.fx.Node) -> torch.fx.Node | None:
    """The other operand of an add node of ``x`` and another tensor (a function or method, no
    scaling); None where ``node`` is not such an add."""
    if node.op == "call_function" and node.target in _ADDS and not node.kwargs and len(node.args) == 2:
        a, b = node.args
    elif node.op == "call_method" and node.target in ("add", "add_") and not node.kwargs and len(node.args) == 2:
        a, b = node.args
    else:
        return None
    other = b if a is x else a if b is x else None
    return other if isinstance(other, torch.fx.Node) and other is not x else None


class _EpilogueTracer(torch.fx.Tracer):
    """Traces through the user's modules, stopping at torch's and spdy's own (the layers the
    rewrite hands epilogues to stay one call each)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (getattr(m, "accepts_epilogue", False) or type(m).__module__ == __name__
                or super().is_leaf_module(m, module_qualified_name))


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _rewrite_epilogues(gm: torch.fx.GraphModule, prefix: str) -> list[str]:
    """Hand each convolution of ``gm``'s graph that accepts an epilogue the add and the activation
    that alone read its output; returns the convolutions' names (``prefix`` + their path)."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    for node in list(graph.nodes):  # folded BatchNorms: nn.Identity, gone from the graph
        if node.op == "call_module" and type(modules.get(str(node.target))) is nn.Identity and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    fused: list[str] = []
    for node in list(graph.nodes):
        target = str(node.target)
        if node.op != "call_module" or not getattr(modules.get(target), "accepts_epilogue", False) \
                or calls[target] != 1 or len(node.args) != 1 or node.kwargs \
                or getattr(modules[target], "clamp", None) is not None:  # its activation taken already
            continue
        end, residual, clamp = node, None, None
        user = _only_user(end)
        if user is not None and (other := _fx_residual(user, end)) is not None:
            end, residual, user = user, other, _only_user(user)
        if user is not None and (clamp := _fx_clamp(user, modules)) is not None:
            end = user
        if end is node:
            continue
        with graph.inserting_before(end):
            call = graph.call_module(target, (node.args[0],) if residual is None else (node.args[0], residual))
        end.replace_all_uses_with(call)
        while end is not node:  # the activation, then the add, then the convolution's old call
            prev = end.args[0] if end.args[0] is not residual else end.args[1]
            graph.erase_node(end)
            end = prev
        graph.erase_node(node)
        modules[target].clamp = clamp  # type: ignore[assignment]
        fused.append(prefix + target)
    if fused:
        graph.lint()
        gm.recompile()
    return fused


def _hosts_epilogue(module: nn.Module) -> bool:
    return any(getattr(m, "accepts_epilogue", False) for m in module.modules())


def fuse_conv_epilogues(model: nn.Module) -> list[str]:
    """Hand the add and the activation after each convolution to the convolution, in place; returns
    the names of the convolutions that took any.

    A convolution takes them where it accepts an epilogue (:class:`SparseConv2d`, any format),
    runs once, and its output is read by nothing but an add of another tensor (a residual
    block's skip connection) and/or a ReLU, ReLU6, Hardtanh or clamp to constants, as modules,
    functions or methods; folded BatchNorms (``nn.Identity``) between them are skipped. The
    patterns are found by tracing with ``torch.fx`` each child of ``model`` whose forward traces
    symbolically (children that do not, because of control flow on values, are searched in their
    own children); a child with a fusion is replaced by its rewritten ``torch.fx.GraphModule``, which
    keeps the names of the layers it calls. The model's own forward is not rewritten."""
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"fuse_conv_epilogues needs an nn.Module; got {type(model).__name__}")
    fused: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            if getattr(child, "accepts_epilogue", False) or not _hosts_epilogue(child):
                continue
            try:
                graph = _EpilogueTracer().trace(child)
            except Exception as exc:  # noqa: BLE001 - any tracing failure: look one level down
                log.debug("fuse_conv_epilogues: %s%s does not trace (%s); trying its children", prefix, name, exc)
                visit(child, f"{prefix}{name}.")
                continue
            gm = torch.fx.GraphModule(child, graph, class_name=type(child).__name__)
            names = _rewrite_epilogues(gm, f"{prefix}{name}.")
            if names:
                setattr(module, name, gm)
                fused.extend(names)

    visit(model, "")
    if fused:
        log.debug("fuse_conv_epilogues: %d convolutions took their add and/or activation", len(fused))
    return fused


def fast_base(model: nn.Module, run: Callable[[nn.Module], Any] | None = None,
              depthwise: Sequence[DepthwiseFusion] | None = None) -> dict[str, list[str]]:
    """What spdy runs around the pruned layers, on its own kernels, in place: :func:`fast_attention`,
    :func:`fast_gelu`, :func:`fast_encoder`, :func:`fast_depthwise` (with the fusions
    ``depthwise``, or those :func:`find_depthwise` finds with ``run``, or each convolution alone)
    and then :func:`fuse_conv_epilogues` and :func:`fuse_conv_activations` (with the same
    fusions). Returns ``{"attention": [...], "gelu": [...], "encoder":
    [...], "depthwise": [...], "conv_epilogue": [...]}``, the names each switched."""
    if depthwise is None and run is not None:
        depthwise = find_depthwise(model, run)
    done = {"attention": fast_attention(model), "gelu": fast_gelu(model), "encoder": fast_encoder(model),
            "depthwise": fast_depthwise(model, depthwise)}
    fused = fuse_conv_epilogues(model)
    return {**done, "conv_epilogue": fused + fuse_conv_activations(model, depthwise or ())}

"""BatchNorm folding: the inference form of a model, in which every BatchNorm that directly
follows a convolution or linear layer is merged into that layer's weight and bias.

In eval mode ``BN(z) = s * (z - mean) + beta`` with ``s = gamma / sqrt(var + eps)``, so
``BN(W x + b) = (s W) x + s (b - mean) + beta``: the layer's output rows (channels) are
scaled by ``s`` and it gets a bias; the BatchNorm becomes ``nn.Identity``. Scaling whole
rows keeps every zero of a pruned weight where it is (a channel whose ``gamma`` is 0
becomes all zeros), so a pruned model folds into a pruned model of the same pattern.

Which layers may fold is found by running the model once (:func:`find_foldable`): a pair
``(layer, norm)`` folds when the layer (an exact ``nn.Conv2d`` or ``nn.Linear``) and the
BatchNorm (an exact ``nn.BatchNorm2d``, or ``nn.BatchNorm1d`` on a 2-D output of a Linear)
each run once, the BatchNorm's input is the very tensor the layer returned, and no other
operation reads that tensor (a residual branch that also takes the convolution's raw
output forbids the fold). Operations are seen through a ``TorchFunctionMode``, so a
functional ``torch.add`` counts as well as a module. Layers whose weight is shared with
another module, and BatchNorms without running statistics, are left alone.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from spdy._modules import swap_modules
from spdy.errors import InvalidInputError
from spdy.types import LayerSpec

log = logging.getLogger(__name__)

__all__ = ["Chain", "FoldPair", "find_chains", "find_foldable", "fold_batchnorm", "fold_scale", "folded_parameters", "folded_specs", "scaled_weight"]

_LAYERS = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d)


@dataclass(frozen=True)
class FoldPair:
    """A BatchNorm (``norm``) that folds into the layer before it (``layer``); module names."""

    layer: str
    norm: str

    def to_json(self) -> list[str]:
        return [self.layer, self.norm]

    @classmethod
    def from_json(cls, obj: Sequence[str]) -> FoldPair:
        if not isinstance(obj, (list, tuple)) or len(obj) != 2 or not all(isinstance(s, str) for s in obj):
            raise InvalidInputError(f"a BatchNorm fold is [layer name, BatchNorm name]; got {obj!r}")
        return cls(obj[0], obj[1])


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, Mapping):
        for x in obj.values():
            yield from _tensors(x)


@dataclass
class _Output:
    """A watched module's output during the trace: who produced it and who read it."""

    ref: weakref.ref[torch.Tensor]
    first: str
    ndim: int
    second: str | None = None  # the module that took it as its input
    foreign_reads: int = 0  # operations outside that module that read it


class _Trace(TorchFunctionMode):
    """Counts, for every watched tensor, the operations that read it outside the module that took it."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, _Output] = {}
        self.inside: list[str] = []  # the second modules running now, innermost last

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):
            rec = self.watched.get(id(t))
            # the id alone could be a new tensor's once the watched one is freed: check it is alive and the same
            if rec is not None and rec.ref() is t and (rec.second is None or not self.inside or self.inside[-1] != rec.second):
                rec.foreign_reads += 1
        return func(*args, **kwargs)


def _single_owner(model: nn.Module, param: torch.Tensor) -> bool:
    return sum(p is param for _, p in model.named_parameters(remove_duplicate=False)) == 1


@dataclass(frozen=True)
class Chain:
    """Module ``second`` reads nothing but the output of module ``first``, and nothing else reads
    that output (found by :func:`find_chains`); ``ndim``: the output's dimensions."""

    first: str
    second: str
    ndim: int


@torch.no_grad()
def find_chains(model: nn.Module, run: Callable[[nn.Module], Any], firsts: Mapping[str, nn.Module],
                seconds: Mapping[str, nn.Module]) -> list[Chain]:
    """The pairs ``(a, b)`` of ``firsts`` and ``seconds`` that one call of ``run(model)`` (a forward
    pass, in eval mode) shows to be a chain: each runs once, ``b``'s first input is the very
    tensor ``a`` returned, and no operation outside ``b`` reads that tensor. Operations are seen
    through a ``TorchFunctionMode``, so a functional ``torch.add`` counts as well as a module."""
    if not firsts or not seconds:
        return []
    trace = _Trace()
    calls: dict[str, int] = {}
    input_of: dict[str, _Output | None] = {}

    def after_first(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inputs: Any, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                trace.watched[id(out)] = _Output(weakref.ref(out), name, out.dim())
        return hook

    def before_second(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            calls[name] = calls.get(name, 0) + 1
            x = inputs[0] if inputs else None
            rec = trace.watched.get(id(x)) if isinstance(x, torch.Tensor) else None
            if rec is not None and (rec.ref() is not x or rec.second is not None):
                rec = None
            if rec is not None:
                rec.second = name
            input_of[name] = rec
            trace.inside.append(name)
        return hook

    def after_second(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inputs: Any, _out: Any) -> None:
            if trace.inside and trace.inside[-1] == name:
                trace.inside.pop()
        return hook

    handles = [m.register_forward_hook(after_first(n)) for n, m in firsts.items()]
    for n, m in seconds.items():
        handles += [m.register_forward_pre_hook(before_second(n)), m.register_forward_hook(after_second(n))]
    was_training = model.training
    try:
        model.eval()
        with trace:
            run(model)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [Chain(rec.first, second, rec.ndim) for second, rec in input_of.items()
            if rec is not None and calls.get(second) == 1 and calls.get(rec.first) == 1 and not rec.foreign_reads]


def find_foldable(model: nn.Module, run: Callable[[nn.Module], Any]) -> tuple[FoldPair, ...]:
    """The BatchNorms of ``model`` that fold into the layer before them, found by ``run(model)``
    (one forward pass on an example batch, in eval mode); see the module doc for the rules."""
    modules = dict(model.named_modules())
    layers = {n: m for n, m in modules.items() if n and type(m) in _LAYERS}
    norms = {n: m for n, m in modules.items() if n and type(m) in _NORMS}
    pairs = []
    for chain in find_chains(model, run, layers, norms):
        why = _unfoldable(model, layers[chain.first], norms[chain.second], chain.ndim)
        if why:
            log.debug("BatchNorm %s stays: %s", chain.second, why)
            continue
        pairs.append(FoldPair(chain.first, chain.second))
    if not norms:
        return ()
    skipped = sorted(set(norms) - {p.norm for p in pairs})
    if skipped:
        log.info("%d of %d BatchNorm layers fold into the layer before them; these stay: %s",
                 len(pairs), len(norms), ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""))
    order = {n: i for i, n in enumerate(layers)}
    return tuple(sorted(pairs, key=lambda p: order[p.layer]))


def _unfoldable(model: nn.Module, layer: nn.Module, norm: nn.Module, out_dim: int | None) -> str | None:
    """Why ``norm`` cannot fold into ``layer`` (None: it can); ``out_dim``: the dims of the layer's output, if seen."""
    if not norm.track_running_stats or norm.running_mean is None or norm.running_var is None:
        return "it normalises with batch statistics (no running statistics)"
    channels = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    if norm.num_features != channels:
        return f"it has {norm.num_features} features, the layer {channels} outputs"
    if isinstance(layer, nn.Linear) and (type(norm) is not nn.BatchNorm1d or (out_dim is not None and out_dim != 2)):
        return "a Linear folds only into a BatchNorm1d over its 2-D output"
    if isinstance(layer, nn.Conv2d) and type(norm) is not nn.BatchNorm2d:
        return "a Conv2d folds only into a BatchNorm2d"
    if not _single_owner(model, layer.weight) or (layer.bias is not None and not _single_owner(model, layer.bias)):
        return "the layer's weight is shared with another module"
    return None


def fold_scale(norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``s = gamma / sqrt(running_var + eps)`` (float64): how a fold scales each output channel."""
    var = norm.running_var.detach().to(torch.float64)
    s = 1.0 / torch.sqrt(var + norm.eps)
    if norm.weight is not None:
        s = s * norm.weight.detach().to(torch.float64)
    return s


def folded_parameters(weight: torch.Tensor, bias: torch.Tensor | None,
                      norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``norm(layer(x))`` as one layer, computed in float64, returned in
    the weight's dtype: ``(s W, s (b - mean) + beta)`` (see :func:`fold_scale`)."""
    s = fold_scale(norm)
    w = weight.detach().to(torch.float64) * s.view(-1, *([1] * (weight.dim() - 1)))
    b = torch.zeros_like(s) if bias is None else bias.detach().to(torch.float64)
    b = (b - norm.running_mean.detach().to(torch.float64)) * s
    if norm.bias is not None:
        b = b + norm.bias.detach().to(torch.float64)
    return w.to(weight.dtype), b.to(weight.dtype)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: Iterable[FoldPair], *, inplace: bool = False) -> nn.Module:
    """``model`` with each pair's BatchNorm folded into its layer and replaced by ``nn.Identity``.

    ``pairs`` come from :func:`find_foldable` (or a pruned model's manifest). The result
    computes what ``model`` computes in eval mode. With ``inplace=False`` (default) a deep
    copy is folded and ``model`` is left as it was; the result is in eval mode.
    """
    pairs = tuple(pairs)
    out = model if inplace else copy.deepcopy(model)
    if not pairs:
        return out.eval()
    identities: dict[str, nn.Module] = {}
    for p in pairs:
        layer, norm = _get(out, p.layer), _get(out, p.norm)
        if type(layer) not in _LAYERS or not isinstance(norm, _NORMS):
            raise InvalidInputError(
                f"cannot fold {p.norm!r} ({type(norm).__name__}) into {p.layer!r} ({type(layer).__name__}): "
                "a BatchNorm folds into an nn.Conv2d or nn.Linear; were the folds recorded for another model?")
        why = _unfoldable(out, layer, norm, None)
        if why:
            raise InvalidInputError(f"cannot fold {p.norm!r} into {p.layer!r}: {why}")
        w, b = folded_parameters(layer.weight, layer.bias, norm)
        layer.weight.copy_(w)
        if layer.bias is None:
            layer.bias = nn.Parameter(b, requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(b)
        identities[p.norm] = nn.Identity()
    swap_modules(out, identities)
    return out.eval()


def folded_specs(specs: Sequence[LayerSpec], pairs: Iterable[FoldPair]) -> list[LayerSpec]:
    """``specs`` as the folded model has them: a layer a BatchNorm folds into has a bias."""
    folded = {p.layer for p in pairs}
    return [replace(s, has_bias=True) if s.name in folded else s for s in specs]


def scaled_weight(weight: np.ndarray, norm: nn.modules.batchnorm._BatchNorm) -> np.ndarray:
    """A (pruned) weight of the layer ``norm`` folds into, as the folded layer holds it: each
    output row scaled by :func:`fold_scale` (float32; zeros stay zeros)."""
    s = fold_scale(norm).numpy()
    w = np.asarray(weight, dtype=np.float64)
    return (w * s.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise InvalidInputError(f"the model has no module named {name!r}") from None

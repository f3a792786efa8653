"""How a user tells spdy which model, which calibration data and which loss.

A :class:`ModelBundle` is what every later stage consumes. Build one directly
through the library API, return one (or a plain ``(model, calibration[, loss])``
tuple or dict) from a ``package.module:factory`` callable, or use a built-in
name such as ``minilm``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import importlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from spdy.errors import InvalidInputError, ModelLoadError, NoPrunableLayersError
from spdy.fold import FoldPair, find_foldable, fold_batchnorm, folded_specs, scaled_weight
from spdy.types import LayerSpec

log = logging.getLogger(__name__)

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Call the model on a batch: a tensor positionally, a mapping as keywords, a tuple unpacked."""
    if isinstance(batch, torch.Tensor):
        out = model(batch)
    elif isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        raise InvalidInputError(
            f"cannot feed a calibration batch of type {type(batch).__name__} to the model; "
            "expected a tensor, a dict of tensors or a tuple. Pass forward=... to say how."
        )
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InvalidInputError(
        f"the model returned {type(out).__name__}; expected a tensor. Pass forward=... returning one."
    )


def relative_mse(pruned: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``||pruned - dense||^2 / ||dense||^2`` over the batch."""
    num = (pruned.float() - dense.float()).pow(2).sum()
    return num / dense.float().pow(2).sum().clamp_min(1e-30)


def cosine_distance(pruned: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(pruned_i, dense_i)`` over the rows (last dim = features)."""
    a = pruned.float().reshape(-1, pruned.shape[-1])
    b = dense.float().reshape(-1, dense.shape[-1])
    return (1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean()


def kl_divergence(pruned: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(dense) || softmax(pruned))`` averaged over the rows of logits."""
    lp = torch.log_softmax(pruned.float(), dim=-1)
    lq = torch.log_softmax(dense.float(), dim=-1)
    return (lq.exp() * (lq - lp)).sum(-1).mean()


LOSSES: dict[str, LossFn] = {"mse": relative_mse, "cosine": cosine_distance, "kl": kl_divergence}


def resolve_loss(loss: str | LossFn | None) -> LossFn:
    if loss is None:
        return relative_mse
    if callable(loss):
        return loss
    if loss in LOSSES:
        return LOSSES[loss]
    raise InvalidInputError(f"unknown loss {loss!r}; expected one of {sorted(LOSSES)} or a callable(pruned, dense)")


def _batch_size(batch: Batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.ndim:
                return int(v.shape[0])
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    return 1


def _hash_into(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"N{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, Mapping):
        for k in sorted(obj):
            h.update(f"K{k}".encode())
            _hash_into(h, obj[k])
    elif isinstance(obj, (tuple, list)):
        h.update(f"L{len(obj)}".encode())
        for x in obj:
            _hash_into(h, x)
    else:
        h.update(repr(obj).encode())


def hash_batches(batches: Iterable[Batch]) -> str:
    """A stable sha256 over the calibration batches (dtype, shape and bytes of every tensor)."""
    h = hashlib.sha256()
    for b in batches:
        _hash_into(h, b)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelBundle:
    """A model with its calibration data and how to score a pruned copy of it.

    * ``calibration``: a sequence of batches (tensor, dict or tuple), streamed one at a time.
    * ``example``: one deployment-shaped batch (default: the first calibration batch); layer
      input shapes and latencies are measured on it.
    * ``forward(model, batch) -> Tensor``: the output the loss compares.
    * ``loss(pruned, dense) -> scalar tensor``: label-free distance to the dense outputs
      by default; any callable works, e.g. a task loss that closes over labels.
    * ``exclude``: glob patterns of layer names that stay dense.
    * ``tune_batchnorm``: re-estimate the BatchNorm running statistics of every pruned
      copy on the calibration set before scoring and saving it ("BN tuning", the usual
      companion of one-shot pruning of CNNs: pruning shifts the activation statistics
      the stored ones were taken on). ``None`` (default): on when the model has
      BatchNorm layers that track running statistics.
    * ``fold_batchnorm``: profile, time and deploy the model in its inference form
      (:attr:`inference`): every BatchNorm that directly follows a Conv2d or Linear folded
      into that layer (:mod:`spdy.fold`), as a deployment runtime runs it. The database and
      the calibration loss still use ``model`` as it is, so that the BatchNorm statistics
      of pruned copies can be re-estimated; folding scales whole output channels, so a
      pruned layer keeps its zeros and its time. False: time the model unfolded.
    """

    name: str
    model: nn.Module
    calibration: Sequence[Batch]
    example: Batch = None
    forward: ForwardFn = default_forward
    loss: LossFn = relative_mse
    exclude: tuple[str, ...] = ()
    calibration_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    tune_batchnorm: bool | None = None
    fold_batchnorm: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise InvalidInputError(f"model must be a torch.nn.Module; got {type(self.model).__name__}")
        if self.calibration is None or len(self.calibration) == 0:
            raise InvalidInputError(
                f"model {self.name!r}: the calibration set is empty; give at least one batch "
                "(spdy needs inputs to reconstruct layers and to score pruned models)"
            )
        if self.example is None:
            object.__setattr__(self, "example", self.calibration[0])
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not self.calibration_id:
            object.__setattr__(self, "calibration_id", hash_batches(self.calibration))
        if self.tune_batchnorm is None:
            object.__setattr__(self, "tune_batchnorm", bool(batchnorm_modules(self.model)))
        self.model.eval()

    @functools.cached_property
    def batchnorm_folds(self) -> tuple[FoldPair, ...]:
        """The BatchNorms that fold into the layer before them (found on ``example``; empty
        without ``fold_batchnorm``)."""
        if not self.fold_batchnorm or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            return ()
        return find_foldable(self.model, lambda m: self.forward(m, self.example))

    @functools.cached_property
    def inference(self) -> ModelBundle:
        """This bundle with the model in its inference form (BatchNorms folded, on a copy made
        at the first access): what the profile times and ``spdy.apply`` returns. The bundle
        itself when nothing folds."""
        folds = self.batchnorm_folds
        if not folds:
            return self
        log.info("%s: timing the inference form, %d BatchNorm layers folded into the layers before them",
                 self.name, len(folds))
        return dataclasses.replace(self, model=fold_batchnorm(self.model, folds), fold_batchnorm=False,
                                   tune_batchnorm=False)

    def inference_layers(self, specs: Sequence[LayerSpec] | None = None) -> list[LayerSpec]:
        """The prunable layers (``specs``, default :meth:`layers`) as the inference form has them
        (a layer a BatchNorm folds into has a bias)."""
        return folded_specs(self.layers() if specs is None else specs, self.batchnorm_folds)

    def inference_weight(self, name: str, weight: np.ndarray) -> np.ndarray:
        """A weight of layer ``name`` (e.g. a pruned one from the database) as the inference form
        holds it: scaled by the folded BatchNorm's dense statistics (the weight itself when none folds)."""
        norm = {p.layer: p.norm for p in self.batchnorm_folds}.get(name)
        return weight if norm is None else scaled_weight(weight, self.model.get_submodule(norm))

    @property
    def n_samples(self) -> int:
        return sum(_batch_size(b) for b in self.calibration)

    def layers(self) -> list[LayerSpec]:
        """The prunable layers, in execution order, with input shapes seen on ``example``."""
        return discover_layers(self.model, self.example, self.forward, self.exclude)

    @torch.no_grad()
    def outputs(self, model: nn.Module | None = None) -> list[torch.Tensor]:
        """Outputs of ``model`` (default: this bundle's) on every calibration batch."""
        m = self.model if model is None else model
        return [self.forward(m, b).detach() for b in self.calibration]

    def _batches(self, batches: Sequence[int] | None) -> list[int]:
        n = len(self.calibration)
        idx = list(range(n)) if batches is None else [int(i) for i in batches]
        if not idx or any(not 0 <= i < n for i in idx):
            raise InvalidInputError(f"calibration batch indices must be a non-empty subset of 0..{n - 1}; got {idx}")
        return idx

    @torch.no_grad()
    def retune_batchnorm(self, model: nn.Module, batches: Sequence[int] | None = None) -> nn.Module:
        """Re-estimate ``model``'s BatchNorm running statistics on the calibration set, in place.

        No-op unless ``tune_batchnorm``. Each BatchNorm layer's statistics become the equally
        weighted average over the calibration batches (momentum ``None``) of what it sees
        when the layers before it normalise with batch statistics, as in training; every
        other module stays in eval mode and ``model`` is left in eval mode. ``batches``
        (indices into the calibration set) restricts it to those batches.
        """
        if not self.tune_batchnorm:
            return model
        bns = batchnorm_modules(model)
        momenta = {n: m.momentum for n, m in bns.items()}
        try:
            for m in bns.values():
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for i in self._batches(batches):
                self.forward(model, self.calibration[i])
        finally:
            for n, m in bns.items():
                m.momentum = momenta[n]
                m.eval()
        return model

    @torch.no_grad()
    def calibration_loss(self, model: nn.Module, dense_outputs: Sequence[torch.Tensor],
                         batches: Sequence[int] | None = None) -> float:
        """Sample-weighted mean of ``loss(model(batch), dense(batch))`` over the calibration set
        (or over the calibration batches with the indices ``batches``)."""
        total, n = 0.0, 0
        for i in self._batches(batches):
            b, ref = self.calibration[i], dense_outputs[i]
            k = _batch_size(b)
            total += float(self.loss(self.forward(model, b), ref)) * k
            n += k
        return total / max(n, 1)


def batchnorm_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics, by name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def batchnorm_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The running statistics of ``model``'s BatchNorm layers (``<layer>.running_mean`` / ``.running_var``)."""
    out = {}
    for n, m in batchnorm_modules(model).items():
        for k in ("running_mean", "running_var"):
            out[f"{n}.{k}"] = getattr(m, k).detach().cpu().numpy().copy()
    return out


def is_prunable(module: nn.Module) -> bool:
    """Linear layers and ungrouped Conv2d layers; depthwise/grouped convs stay dense."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


@torch.no_grad()
def discover_layers(
    model: nn.Module, example: Batch, forward: ForwardFn = default_forward, exclude: Sequence[str] = ()
) -> list[LayerSpec]:
    """Find the prunable layers and capture the input shape each really sees on ``example``.

    Layers matched by a pattern in ``exclude`` (fnmatch globs on the module name) and
    layers that do not run on ``example`` stay dense and are not returned.
    """
    candidates = {
        n: m for n, m in model.named_modules() if n and is_prunable(m) and not any(fnmatch.fnmatch(n, p) for p in exclude)
    }
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def _h(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            if name not in shapes:
                shapes[name] = tuple(int(s) for s in inputs[0].shape)
                order.append(name)

        return _h

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in candidates.items()]
    try:
        model.eval()
        forward(model, example)
    finally:
        for h in handles:
            h.remove()
    skipped = sorted(set(candidates) - set(shapes))
    if skipped:
        log.info("layers not run on the example batch stay dense: %s", ", ".join(skipped))
    specs = []
    for n in order:
        m = candidates[n]
        if isinstance(m, nn.Linear):
            specs.append(LayerSpec(n, "linear", tuple(m.weight.shape), shapes[n], m.bias is not None))
        else:
            assert isinstance(m, nn.Conv2d)
            if isinstance(m.padding, str):
                raise InvalidInputError(f"layer {n!r}: string padding {m.padding!r} is not supported; use integers")
            specs.append(
                LayerSpec(
                    n, "conv2d", tuple(m.weight.shape), shapes[n], m.bias is not None,
                    stride=tuple(m.stride), padding=tuple(m.padding), dilation=tuple(m.dilation),  # type: ignore[arg-type]
                )
            )
    if not specs:
        raise NoPrunableLayersError(
            f"found no prunable layer in {type(model).__name__} (looked for nn.Linear and ungrouped nn.Conv2d"
            + (f", excluding {list(exclude)}" if exclude else "")
            + " that run on the example batch); check the model and the exclude patterns"
        )
    return specs


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise InvalidInputError(f"the model has no layer named {name!r}") from exc


def _bundle_from_factory_result(name: str, result: Any, **overrides: Any) -> ModelBundle:
    if isinstance(result, ModelBundle):
        return result
    if isinstance(result, Mapping):
        kw = dict(result)
        if "model" not in kw or "calibration" not in kw:
            raise ModelLoadError(f"factory {name!r} returned a dict without 'model' and 'calibration' keys: {sorted(kw)}")
    elif isinstance(result, (tuple, list)) and 2 <= len(result) <= 3:
        kw = {"model": result[0], "calibration": result[1]}
        if len(result) == 3:
            kw["loss"] = result[2]
    else:
        raise ModelLoadError(
            f"factory {name!r} returned {type(result).__name__}; expected a ModelBundle, "
            "a (model, calibration[, loss]) tuple, or a dict with those keys"
        )
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if "loss" in kw:
        kw["loss"] = resolve_loss(kw["loss"])
    kw.setdefault("name", name)
    kw["calibration"] = list(kw["calibration"])
    return ModelBundle(**kw)


#: built-in model names and the factories (``package.module:function``) they load
BUILTIN_MODELS: dict[str, str] = {"minilm": "spdy.models.minilm:load_minilm"}


def load_model(spec: str, *, exclude: Sequence[str] = (), loss: str | None = None, **kwargs: Any) -> ModelBundle:
    """Load a model by name: a built-in (``minilm``) or ``package.module:factory``.

    Extra keyword arguments go to the factory (a built-in name is its factory in
    :data:`BUILTIN_MODELS`).
    """
    factory = BUILTIN_MODELS.get(spec, spec)
    if ":" not in factory:
        raise ModelLoadError(
            f"unknown model {spec!r}; expected a built-in name ({', '.join(BUILTIN_MODELS)}) "
            "or 'package.module:factory'"
        )
    mod_name, _, fn_name = factory.partition(":")
    if not all(part.isidentifier() for part in mod_name.split(".")) or not fn_name.isidentifier():
        raise ModelLoadError(
            f"model {spec!r} is not of the form 'package.module:factory' (a module path, one colon, a function "
            "name); pass a built-in name (" + ", ".join(BUILTIN_MODELS) + ") or e.g. spdy.examples.digits:factory"
        )
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import module {mod_name!r} for model {spec!r}: {exc}. "
            "Is the package installed or on PYTHONPATH?"
        ) from exc
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ModelLoadError(f"module {mod_name!r} has no callable {fn_name!r} (model spec {spec!r})")
    try:
        result = fn(**kwargs)
    except TypeError as exc:
        raise ModelLoadError(f"calling factory {spec!r} with {sorted(kwargs)} failed: {exc}") from exc
    bundle = _bundle_from_factory_result(spec, result)
    if exclude or loss is not None:
        import dataclasses

        bundle = dataclasses.replace(
            bundle,
            exclude=tuple(bundle.exclude) + tuple(exclude),
            loss=resolve_loss(loss) if loss is not None else bundle.loss,
        )
    return bundle

"""The torch modules a pruned model runs with, and how they go into a model.

:class:`CsrLinear` (torch's CSR ``addmm``) and :class:`SemiStructuredLinear` (2:4 sparse
tensor cores) are what :mod:`spdy.runtime_cuda` installs in a model and what the
``torch-cpu`` / ``torch-cuda`` backends time. :func:`swap_modules` is the one way spdy
replaces layers of a model: every reference to a replaced module changes, so a module
shared by two parents (reachable under two names) never runs half old, half new.
:func:`move_batch` moves a batch (tensor, mapping or tuple) to a device and dtype.

This module imports torch only, so the runtime and the profilers can both build on it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from spdy.errors import InvalidInputError

log = logging.getLogger(__name__)

__all__ = ["CsrLinear", "SemiStructuredLinear", "move_batch", "set_submodule", "swap_modules"]


class CsrLinear(torch.nn.Module):
    """``y = x W^T + b`` with W in torch's CSR format: ``addmm(b, W, x^T)^T``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.weight = weight.to_sparse_csr()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.bias is None:
            y = torch.mm(self.weight, x2.t())
        else:
            y = torch.addmm(self.bias.unsqueeze(1), self.weight, x2.t())
        return y.t().contiguous().reshape(*x.shape[:-1], self.out_features)


class SemiStructuredLinear(torch.nn.Module):
    """``F.linear`` with a 2:4 weight from ``torch.sparse.to_sparse_semi_structured``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def move_batch(batch: Any, device: Any, dtype: Any = None) -> Any:
    """``batch`` (tensor, mapping or tuple) with every tensor on ``device``; floating tensors cast to ``dtype``."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device=device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device, dtype) for v in batch)
    return batch


def _named_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    if not name:
        raise InvalidInputError("a layer name is needed: the model itself cannot be swapped in place")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise InvalidInputError(f"the model has no layer named {name!r}") from None


def swap_modules(model: torch.nn.Module, replacements: Mapping[str, torch.nn.Module]) -> None:
    """Replace each named submodule (dotted path) by its new module, in place.

    Every reference to a replaced module changes: a module shared by two parents,
    reachable under two names, is replaced under both even if only one name is given.
    Where two given names reach one shared module, the first name's replacement is used
    for all of them (the caller builds equivalent modules for one module).
    """
    by_id: dict[int, torch.nn.Module] = {}
    for name, new in replacements.items():
        old = _named_module(model, name)
        if id(old) in by_id:
            log.debug("layer %s is shared with a layer swapped before; it keeps that replacement", name)
            continue
        by_id[id(old)] = new
    if not by_id:
        return
    for parent in list(model.modules()):
        # _modules, not named_children(): the latter skips a child registered twice
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in by_id:
                setattr(parent, child_name, by_id[id(child)])


def set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module`` (see :func:`swap_modules`)."""
    swap_modules(model, {name: module})

"""Plans: how every prunable layer runs in a model that a backend times end to end.

A plan is ``{layer name: LayerChoice}`` (weight with zeros where pruned, the model's
bias, kernel format, sparsity), what :meth:`~spdy.profilers.base.Backend.time_models`
takes. :func:`backend_plan` builds every plan: each layer's :class:`~spdy.choices.Choice`
(a grid level or an N:M pattern) and kernel format come from a
:class:`~spdy.types.Solution` (one of the profile's table, or of a table with N:M
columns); the weights from a database or any ``weight(name, choice)`` callable (the
model's own weights, magnitude pruning); the biases always from the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from spdy.choices import Choice
from spdy.errors import InvalidInputError
from spdy.models.base import get_module
from spdy.profilers.base import DENSE, LayerChoice
from spdy.types import Solution

__all__ = ["layer_choice", "backend_plan"]

#: ``weight(layer name, choice)``: the layer's weight for that choice.
WeightSource = Callable[[str, Choice], np.ndarray]


def layer_choice(model: Any, name: str, fmt: str, weight: np.ndarray, sparsity: float) -> LayerChoice:
    """Layer ``name`` of ``model`` running ``weight`` (copied to float32) in format ``fmt``, with its own bias."""
    mod = get_module(model, name)
    bias = None if getattr(mod, "bias", None) is None else mod.bias.detach().float().cpu().numpy().copy()
    return LayerChoice(fmt, np.array(weight, dtype=np.float32), bias, float(sparsity))


def backend_plan(
    choices: Mapping[str, Choice] | Solution,
    weights: WeightSource | Any,
    model: Any,
    formats: Mapping[str, str] | None = None,
) -> dict[str, LayerChoice]:
    """Each layer as chosen, for ``Backend.time_models``.

    ``choices``: a :class:`~spdy.types.Solution` or ``{layer: Choice}``. ``weights``: a
    database (its ``weight(name, choice)``, N:M choices included) or such a callable.
    Each layer's kernel format comes from ``formats`` (default: the solution's own, e.g. the
    profile's format for that level; else dense). A format of ``""`` (no kernel on this
    backend) is an error.
    """
    if isinstance(choices, Solution):
        if formats is None and choices.formats is not None:
            formats = dict(zip(choices.layers, choices.formats))
        choices = choices.as_choices()
    weight = weights.weight if hasattr(weights, "weight") else weights
    formats = dict(formats or {})
    plan = {}
    for name, c in choices.items():
        fmt = formats.get(name, DENSE)
        if not fmt:
            raise InvalidInputError(f"layer {name!r}: choice {c.label} has no kernel format on this backend")
        plan[name] = layer_choice(model, name, fmt, weight(name, c), c.sparsity)
    return plan

"""Plans: how every prunable layer runs in a model that a backend times end to end.

A plan is ``{layer name: LayerChoice}`` (weight with zeros where pruned, the model's
bias, kernel format, sparsity), what :meth:`~spdy.profilers.base.Backend.time_models`
takes. Two ways to say what each layer runs, one builder behind them:

* :func:`level_plan` — a grid level per layer (a :class:`~spdy.types.Solution`'s
  ``levels``), each in the kernel format the profile chose for that level;
* :func:`backend_plan` — a :class:`~spdy.choices.Choice` per layer (N:M patterns
  included), each in the format given (a :class:`~spdy.choices.ChoiceSolution`'s own).

The weights come from a callable (a database, the model's own weights, magnitude
pruning); the biases always from the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from spdy.choices import Choice, ChoiceSolution
from spdy.errors import InvalidInputError
from spdy.models.base import get_module
from spdy.profile import Profile
from spdy.profilers.base import DENSE, LayerChoice

__all__ = ["layer_choice", "level_plan", "backend_plan"]


def layer_choice(model: Any, name: str, fmt: str, weight: np.ndarray, sparsity: float) -> LayerChoice:
    """Layer ``name`` of ``model`` running ``weight`` (copied to float32) in format ``fmt``, with its own bias."""
    mod = get_module(model, name)
    bias = None if getattr(mod, "bias", None) is None else mod.bias.detach().float().cpu().numpy().copy()
    return LayerChoice(fmt, np.array(weight, dtype=np.float32), bias, float(sparsity))


def level_plan(
    profile: Profile, model: Any, levels: Sequence[int] | np.ndarray | None,
    weight: Callable[[str, int], np.ndarray],
) -> dict[str, LayerChoice]:
    """Each layer of the profile at its grid level (``None``: all at level 0) in the profile's
    format for that level (dense where the profile records no formats); ``weight(name, level)``
    gives the layer's weight."""
    t = profile.table
    plan = {}
    for li, name in enumerate(t.layers):
        lv = 0 if levels is None else int(levels[li])
        fmt = profile.formats[li][lv] if profile.formats is not None else DENSE
        plan[name] = layer_choice(model, name, fmt, weight(name, lv), t.grid[lv])
    return plan


def backend_plan(
    choices: Mapping[str, Choice] | ChoiceSolution,
    database: Any,
    model: Any,
    formats: Mapping[str, str] | None = None,
) -> dict[str, LayerChoice]:
    """Each layer as chosen, for ``Backend.time_models``.

    Weights come from ``database`` (N:M choices included), biases from ``model``; each
    layer's kernel format from ``formats`` (default: a :class:`ChoiceSolution`'s own
    ``formats``; else dense). A format of ``""`` (unavailable) is an error.
    """
    if isinstance(choices, ChoiceSolution):
        if formats is None and choices.formats is not None:
            formats = dict(zip(choices.layers, choices.formats))
        choices = choices.as_dict()
    formats = dict(formats or {})
    plan = {}
    for name, c in choices.items():
        fmt = formats.get(name, DENSE)
        if not fmt:
            raise InvalidInputError(f"layer {name!r}: choice {c.label} has no kernel format on this backend")
        plan[name] = layer_choice(model, name, fmt, database.weight(name, c), c.sparsity)
    return plan

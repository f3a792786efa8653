"""The quality guard: is the pruned model still close to the dense one?

A search always delivers the model with the lowest calibration loss it found for the
budget, however bad that loss is. The guard compares the loss with a yardstick that
needs no labels: the loss of a model that ignores its input and always answers the
mean of the dense model's outputs over the calibration set (:func:`constant_loss`; for a
classifier, the mean class probabilities).
A pruned model whose loss reaches :data:`FAR_RATIO` of that is far from the dense
model, whatever the loss function. For classifiers (KL loss on logits, or
``bundle.meta["outputs"] == "logits"``) the share of calibration samples whose top-1
class agrees with the dense model's is reported too, and below :data:`MIN_TOP1` the
model counts as far as well; below :data:`WARN_TOP1` a model that is not far gets a
warning of its own (its answers changed, with the numbers), without a safer target.

When it fires, :func:`assess` bisects over uniform pruning for the largest target
whose loss stays under the line: a target SPDY can reach at least as well, since it
beats uniform pruning at equal speed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spdy.models.base import ModelBundle, kl_divergence

log = logging.getLogger(__name__)

#: loss over the constant-output loss at which a pruned model counts as far from the dense one
FAR_RATIO = 0.8
#: top-1 agreement with the dense model below which a pruned classifier counts as far from it
MIN_TOP1 = 0.5
#: top-1 agreement below which a classifier that is not far is still reported: its answers changed
WARN_TOP1 = 0.9
#: bisection steps for the largest target that keeps uniform pruning under the line
BISECT_STEPS = 6
#: a reference whose 1x takes more than this over the dense plan is named as the reason no target is safe
FLOOR_TOLERANCE = 1.05


@dataclass(frozen=True)
class Quality:
    """How close the pruned model stays to the dense one on the calibration set."""

    loss: float
    constant_loss: float
    top1_agreement: float | None = None
    largest_target: float | None = None
    #: the speedup over the dense plan that 1x over the reference takes (> 1: the reference runs
    #: the dense model faster than spdy's dense plan does)
    reference_floor: float = 1.0

    @property
    def ratio(self) -> float:
        return self.loss / self.constant_loss if self.constant_loss > 0 else math.inf

    @property
    def far(self) -> bool:
        return self.ratio >= FAR_RATIO or (self.top1_agreement is not None and self.top1_agreement < MIN_TOP1)

    @property
    def degraded(self) -> bool:
        """Not far, but a classifier whose top-1 class differs from the dense model's on more than
        ``1 - WARN_TOP1`` of the calibration samples."""
        return not self.far and self.top1_agreement is not None and self.top1_agreement < WARN_TOP1

    def message(self, target: float) -> str:
        """The warning a far or degraded model gets ("" for neither)."""
        if self.degraded:
            a = self.top1_agreement
            return (f"the pruned model for {target:g}x changes the dense model's top-1 class on {1 - a:.0%} of the "
                    f"calibration samples (agreement {a:.0%}; calibration loss {self.loss:.4g}, {self.ratio:.0%} of "
                    f"what a constant output scores): check it on held-out data before deploying it, or ask for a "
                    f"lower --speedup")
        if not self.far:
            return ""
        parts = [f"the pruned model for {target:g}x is far from the dense one: calibration loss {self.loss:.4g} is "
                 f"{self.ratio:.0%} of what a constant output (the dense outputs' mean) scores ({self.constant_loss:.4g})"]
        if self.top1_agreement is not None:
            parts.append(f"its top-1 class agrees with the dense model's on {self.top1_agreement:.0%} of the calibration samples")
        if self.largest_target:
            hint = (f"uniform pruning stays under {FAR_RATIO:.0%} of it up to {self.largest_target:.3g}x: ask for at most "
                    "about that")
        elif self.reference_floor > FLOOR_TOLERANCE:
            hint = (f"no uniform pruning from 1x to {target:g}x stays under the line: just matching the reference "
                    f"takes {self.reference_floor:.2f}x over spdy's own dense plan (the reference runs the dense model "
                    "that much faster), which already prunes too hard; ask for a speedup over torch eager "
                    "(--reference torch), or deploy the dense model in the reference runtime")
        else:
            hint = "even light uniform pruning does not stay under the line: check the model's calibration data and loss"
        return "; ".join(parts) + f". {hint}"

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "constant_output_loss": self.constant_loss, "loss_over_constant": self.ratio,
                "top1_agreement": self.top1_agreement, "far": self.far, "far_ratio": FAR_RATIO,
                "degraded": self.degraded, "warn_top1": WARN_TOP1,
                "largest_target_uniform_keeps": self.largest_target, "reference_floor_dp_speedup": self.reference_floor}


def constant_loss(bundle: ModelBundle, dense_outputs: Sequence[torch.Tensor]) -> float:
    """The calibration loss of always answering the mean of the dense outputs (sample-weighted).

    For a classifier the mean is taken over the class probabilities (the dense model's
    class frequencies, as logits), not over the logits.
    """
    flat = torch.cat([o.detach().float().reshape(o.shape[0], -1) for o in dense_outputs])
    if is_classifier(bundle):
        k = dense_outputs[0].shape[-1]
        mean = torch.softmax(flat.reshape(-1, k), dim=-1).mean(0).clamp_min(1e-12).log()
        mean = mean.repeat(flat.shape[1] // k)
    else:
        mean = flat.mean(0)
    total, n = 0.0, 0
    for o in dense_outputs:
        const = mean.reshape(o.shape[1:]).expand_as(o).to(o.dtype)
        total += float(bundle.loss(const, o)) * o.shape[0]
        n += o.shape[0]
    return total / max(n, 1)


def is_classifier(bundle: ModelBundle) -> bool:
    return bundle.loss is kl_divergence or bundle.meta.get("outputs") == "logits"


@torch.no_grad()
def top1_agreement(pruned: Sequence[torch.Tensor], dense: Sequence[torch.Tensor]) -> float:
    """Share of rows (samples, or tokens of a sequence) whose argmax agrees."""
    hits = total = 0
    for p, d in zip(pruned, dense):
        a = p.float().reshape(-1, p.shape[-1]).argmax(-1)
        b = d.float().reshape(-1, d.shape[-1]).argmax(-1)
        hits += int((a == b).sum())
        total += int(a.numel())
    return hits / max(total, 1)


def assess(objective: Any, table: Any, levels: np.ndarray, loss: float, target: float,
           to_dp: Callable[[float], float] | None = None) -> Quality:
    """The :class:`Quality` of ``levels``, whose calibration loss on ``objective`` (a
    :class:`~spdy.stages.CalibrationObjective`) is ``loss``, with the largest safe target when it is far.

    ``to_dp`` turns a target into a speedup over the table's dense plan (the reference's time
    ratio, :meth:`spdy.reference.Reference.dp_speedup`); default: the target itself."""
    from spdy.baselines import uniform
    from spdy.errors import InfeasibleBudgetError

    bundle, dense = objective.bundle, objective.dense_outputs
    classifier = is_classifier(bundle)
    const = constant_loss(bundle, dense)
    q = Quality(float(loss), const, top1_agreement(objective.outputs(levels), dense) if classifier else None,
                reference_floor=float(to_dp(1.0)) if to_dp is not None else 1.0)
    if not q.far:
        return q
    lo, hi = 1.0, float(target)
    for _ in range(BISECT_STEPS):
        mid = (lo + hi) / 2
        try:
            sol = uniform(table, to_dp(mid) if to_dp is not None else mid)
        except InfeasibleBudgetError:
            hi = mid
            continue
        ok = Quality(float(objective(sol.levels)), const,
                     top1_agreement(objective.outputs(sol.levels), dense) if classifier else None)
        lo, hi = (mid, hi) if not ok.far else (lo, mid)
    q = dataclasses.replace(q, largest_target=lo if lo > 1.0 else None)
    log.warning("%s", q.message(target))
    return q

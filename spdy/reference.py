"""What a speedup target is held against: the dense runtime a user would deploy instead.

``spdy search --speedup 2x`` asks for a pruned model twice as fast as the dense model in
the reference runtime (:data:`REFERENCES`, ``--reference``):

* ``fastest`` (the default): the fastest of the dense runtimes measured here (torch eager, for
  CNNs torch eager in ``channels_last``, torch.compile and ONNX Runtime);
* ``torch``: torch eager, for users who deploy the model in eager torch;
* ``torch_channels_last``: torch eager in the ``channels_last`` memory format (CNNs that take
  one image batch only);
* ``torch_compile``: the model compiled by ``torch.compile`` (CPU, float32);
* ``onnxruntime``: ONNX Runtime (an error where it cannot run the model).

Each runs the dense model as :mod:`spdy.profilers.dense_runtimes` describes. Where
torch.compile or ONNX Runtime cannot run the model, ``fastest`` is the fastest of the others,
with a warning.

The latency table predicts speedups over the backend's own dense plan, so the DP's target
is the target divided by the reference's :attr:`Reference.ratio`: the reference's dense time
over the dense plan's, each round's ratio taken side by side in the same process (the
median over rounds), never from times measured at different moments.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spdy.errors import InvalidInputError, ReferenceUnavailableError
from spdy.profilers.dense_runtimes import (
    DENSE_PLAN,
    LABELS,
    ONNXRUNTIME,
    RUNTIMES,
    TORCH,
    TORCH_CHANNELS_LAST,
    TORCH_COMPILE,
    DenseRuntimes,
    dense_runtimes,
)

log = logging.getLogger(__name__)

FASTEST = "fastest"
#: the choices of ``--reference``
REFERENCES = (FASTEST, TORCH, TORCH_CHANNELS_LAST, TORCH_COMPILE, ONNXRUNTIME)
#: the DP never aims below this, even where the dense plan alone is faster than the reference
MIN_DP_TARGET = 1.01


def check_reference(name: str) -> str:
    """``name`` if it is one of :data:`REFERENCES`, else :class:`InvalidInputError`."""
    if name not in REFERENCES:
        raise InvalidInputError(f"unknown reference {name!r}; expected one of {', '.join(REFERENCES)}")
    return name


def open_runtimes(backend: Any, bundle: Any, asked: str) -> DenseRuntimes:
    """The dense runtimes to measure next to the pruned models
    (:func:`~spdy.profilers.dense_runtimes.dense_runtimes`; ``bundle`` the model as the backend
    times it); :class:`ReferenceUnavailableError` when the one ``asked`` for cannot run it."""
    runtimes = dense_runtimes(backend, bundle)
    check_available(check_reference(asked), runtimes)
    left = [LABELS[n] for n in RUNTIMES if n in runtimes.runtimes]
    stated_over = (left[0] if len(left) == 1 else "the fastest of " + " and ".join(left)) if asked == FASTEST else None
    for name, why in runtimes.unavailable.items():
        log.warning("%s", _unavailable_line(name, why, stated_over))
    return runtimes


def _unavailable_line(name: str, why: str, stated_over: str | None) -> str:
    """A dense runtime that cannot run the model, and (``stated_over``) what speedups are stated over instead."""
    return (f"{LABELS[name]} cannot run this model here, so it is not a reference ({why})"
            + (f"; speedups are stated over {stated_over}" if stated_over else ""))


def check_available(asked: str, runtimes: DenseRuntimes) -> None:
    """Raise :class:`ReferenceUnavailableError` when the runtime ``asked`` for cannot run the model."""
    if asked in runtimes.unavailable:
        raise ReferenceUnavailableError(
            f"--reference {asked}: {LABELS[asked]} cannot run this model here ({runtimes.unavailable[asked]}). "
            f"Use --reference {TORCH} (or {FASTEST}, which then falls back to torch eager)")
    if asked == TORCH_CHANNELS_LAST and runtimes.runtimes and asked not in runtimes.runtimes:
        raise ReferenceUnavailableError(
            f"--reference {asked}: {LABELS[asked]} is measured only for a model with convolutions that takes one "
            f"4-D image batch, on the CPU in float32; this one is not. Use --reference {TORCH} or {FASTEST}")


@dataclass(frozen=True)
class Reference:
    """The dense runtime a search's target is held against, as measured side by side with the dense plan.

    ``runtime`` is :data:`~spdy.profilers.dense_runtimes.TORCH`, ``ONNXRUNTIME``, or ``DENSE_PLAN``
    when nothing was measured (``measure=False``); ``ratio`` its dense time over the dense plan's
    (the median of the rounds' ratios); ``dense_s`` each measured runtime's median dense time;
    ``unavailable`` the runtimes that cannot run the model, and why.
    """

    asked: str
    runtime: str
    ratio: float = 1.0
    dense_s: Mapping[str, float] = field(default_factory=dict)
    ratios: Mapping[str, float] = field(default_factory=dict)
    unavailable: Mapping[str, str] = field(default_factory=dict)
    rounds: int = 0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.ratio) and self.ratio > 0):
            raise InvalidInputError(f"a reference's time ratio must be finite and > 0; got {self.ratio}")

    @classmethod
    def unmeasured(cls, asked: str) -> "Reference":
        """Nothing timed end to end: the target is held against the dense plan, as the profile predicts."""
        return cls(check_reference(asked), DENSE_PLAN)

    @classmethod
    def from_rounds(cls, asked: str, plan_s: Sequence[float], runtime_s: Mapping[str, Sequence[float]],
                    unavailable: Mapping[str, str]) -> "Reference":
        """The reference ``asked`` for, from per-round dense times of the plan and of each runtime."""
        plan = np.asarray(plan_s, dtype=np.float64)
        ratios = {n: float(np.median(np.asarray(runtime_s[n], dtype=np.float64) / plan)) for n in RUNTIMES
                  if n in runtime_s}
        if not ratios:
            return cls(asked, DENSE_PLAN, unavailable=dict(unavailable))
        if asked == FASTEST:
            runtime = min(ratios, key=lambda n: (ratios[n], RUNTIMES.index(n)))
        elif asked in ratios:
            runtime = asked
        else:
            raise ReferenceUnavailableError(
                f"--reference {asked}: {LABELS[asked]} was not measured ({unavailable.get(asked, 'no runner')})")
        dense = {DENSE_PLAN: float(np.median(plan)),
                 **{n: float(np.median(np.asarray(v, dtype=np.float64))) for n, v in runtime_s.items()}}
        return cls(asked, runtime, ratios[runtime], dense, ratios, dict(unavailable), len(plan))

    @property
    def label(self) -> str:
        return LABELS[self.runtime] if self.measured else f"the {LABELS[DENSE_PLAN]}"

    @property
    def measured(self) -> bool:
        return self.runtime != DENSE_PLAN

    def dp_speedup(self, target: float) -> float:
        """``target`` over the reference as a speedup over the dense plan (the DP's terms), at least
        :data:`MIN_DP_TARGET`."""
        return max(target / self.ratio, MIN_DP_TARGET)

    def over_reference(self, dp_speedup: float) -> float:
        """A speedup over the dense plan as one over the reference."""
        return dp_speedup * self.ratio

    def warnings(self) -> tuple[str, ...]:
        """One line per dense runtime that could not run the model (and what that means for the target)."""
        out = []
        for name, why in self.unavailable.items():
            fell_back = self.asked == FASTEST and self.runtime != name and self.measured
            out.append(_unavailable_line(name, why, self.label if fell_back else None))
        return tuple(out)

    def describe(self) -> str:
        """One line: the reference and the dense times measured."""
        if not self.measured:
            return "over the dense plan (nothing measured end to end)"
        order = sorted(self.dense_s, key=lambda n: (n != self.runtime, n == DENSE_PLAN))
        times = ", ".join(f"{LABELS[n]} {self.dense_s[n] * 1e3:.2f} ms" for n in order)
        how = f"--reference {self.asked}" + (": the fastest of torch eager, torch.compile and ONNX Runtime" if self.asked == FASTEST else "")
        return f"over {self.label} ({how}); the dense model measured: {times}"

    def to_json(self) -> dict[str, Any]:
        return {"asked": self.asked, "runtime": self.runtime, "label": self.label, "ratio_to_dense_plan": self.ratio,
                "ratios_to_dense_plan": dict(self.ratios), "dense_time_s": dict(self.dense_s),
                "unavailable": dict(self.unavailable), "rounds": self.rounds}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Reference":
        return cls(str(d["asked"]), str(d["runtime"]), float(d.get("ratio_to_dense_plan", 1.0)),
                   dict(d.get("dense_time_s", {})), dict(d.get("ratios_to_dense_plan", {})),
                   dict(d.get("unavailable", {})), int(d.get("rounds", 0)))

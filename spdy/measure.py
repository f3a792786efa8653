"""End-to-end measurement: the latency check before the search, the measurement after it, the fit.

The latency profile predicts a pruned model's time as the sum of its layers' times
plus a base; :func:`latency_correction` times two pruned models for the target to see
how far that prediction is off and :func:`check_latency` scales the DP's target by it.
After the search, :func:`measure_and_fit` times the dense model, SPDY's answer and the
baselines end to end (:func:`measure_speedups`), and :func:`fit_to_measured` re-solves
the models that measured outside ``FIT_BAND`` x the target. :class:`MeasureConfig`
holds the settings of all three.

Every one of these measurements also times the dense model in torch eager, torch.compile and ONNX Runtime
(:mod:`spdy.profilers.dense_runtimes`): the target is a speedup over the reference among them
(:mod:`spdy.reference`), the latency check measures the reference's time ratio to the dense
plan that the DP's target is converted with, and the fit holds the speedup over the
reference to the target.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

try:  # before torch: torch and the spdy kernels then share one OpenMP pool
    import spdy.kernels  # noqa: F401
except ImportError:  # pragma: no cover - numba missing
    pass

import numpy as np
import torch

from spdy import dp
from spdy.baselines import global_magnitude, uniform
from spdy.choices import Choice
from spdy.errors import InfeasibleBudgetError, InvalidInputError
from spdy.models.base import ModelBundle, get_module
from spdy.profile import Profile
from spdy.profilers.dense_runtimes import DENSE_PLAN, LABELS, STATE_PROBE, DenseRuntimes, time_with_runtimes
from spdy.reference import FASTEST, MIN_DP_TARGET, Reference
from spdy.results import Outcome
from spdy.stages import CalibrationObjective, Prepared, Progress, check_reachable
from spdy.types import Solution

log = logging.getLogger(__name__)

#: measured / target below this makes a search warn loudly
SPEEDUP_TOLERANCE = 0.95
#: with ``--reference fastest``, another dense runtime whose speedup is below this x the
#: reference's makes a search warn: it ran the dense model faster than the reference did
FASTER_RUNTIME_MARGIN = 0.95


@dataclass(frozen=True)
class MeasureConfig:
    """How :func:`spdy.search` checks the latency model and measures its answer end to end.

    * ``measure``: time the dense, SPDY and baseline models end to end (off: the result
      holds predicted speedups only, and neither the latency check nor the fit runs);
    * ``measure_rounds``: interleaved rounds of each measurement (times and speedups are
      medians over the rounds);
    * ``fit_rounds``: re-solve models that measured outside ``FIT_BAND`` x the target at
      most this many times (:func:`fit_to_measured`; 0 = off);
    * ``fit_evals``: calibration-loss evaluations SPDY spends on each new budget of the fit
      (:meth:`spdy.sensitivity.Search.refine`); a baseline's costs one;
    * ``calibrate``: before searching, scale the DP's target by how far the latency model
      is off end to end (:func:`check_latency`);
    * ``percentile``: which percentile of a model's speedups measured during the run (one per
      interleaved round, every measurement of that model pooled) is its measured speedup,
      the figure the fit holds to the target: 50 (the median) by default; 10 asks that
      nine rounds in ten meet the target, the machine's slow spells included.
    """

    measure: bool = True
    measure_rounds: int = 3
    fit_rounds: int = 2
    fit_evals: int = 16
    calibrate: bool = True
    percentile: float = 50.0

    def __post_init__(self) -> None:
        if not 0 < self.percentile < 100:
            raise InvalidInputError(f"percentile must lie strictly between 0 and 100 (50 = median); got {self.percentile}")
        if self.measure_rounds < 1:
            raise InvalidInputError(f"measure_rounds must be >= 1; got {self.measure_rounds}")
        if self.fit_rounds < 0:
            raise InvalidInputError(f"fit_rounds must be >= 0 (0 turns the fit off); got {self.fit_rounds}")
        if self.fit_evals < 1:
            raise InvalidInputError(f"fit_evals must be >= 1; got {self.fit_evals}")


@dataclass(frozen=True)
class Measured:
    """SPDY's answer and the baselines after :func:`measure_and_fit`, with what it found."""

    best: Outcome
    baselines: dict[str, Outcome | str]
    dense_s: float | None  # the dense plan's median time
    drift: float
    fit: tuple[dict[str, Any], ...]
    stage_s: dict[str, float]
    warnings: tuple[str, ...]
    percentile: float = 50.0  # which percentile of the rounds' speedups ``measured_speedup`` is
    reference: Reference | None = None  # what ``measured_speedup`` is over
    dense_runtime_s: dict[str, float] = dataclasses.field(default_factory=dict)  # median dense time per runtime


def _weights(bundle: ModelBundle, database: Any) -> Callable[[str, Choice], np.ndarray]:
    """``weight(name, choice)`` of a measured model in its inference form: the folded model's own
    weight where dense, else the database's, scaled as the fold scales it (the zeros stay)."""
    folded = bundle.inference.model

    def weight(name: str, choice: Choice) -> np.ndarray:
        if choice.is_dense:
            return get_module(folded, name).weight.detach().float().numpy()
        return bundle.inference_weight(name, database.weight(name, choice))
    return weight


@dataclass(frozen=True)
class Rounds:
    """End-to-end times of the dense model (the backend's dense plan, and ``runtimes``: torch eager,
    ONNX Runtime), pruned models and the base, one row per round. Speedups are over ``reference``."""

    dense_s: np.ndarray  # [rounds], the dense plan
    times: dict[str, np.ndarray]  # name -> [rounds]
    base_s: np.ndarray  # [rounds]
    runtimes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # runtime -> [rounds]
    reference: str = DENSE_PLAN
    extra_s: np.ndarray | None = None  # [rounds, extra plans]

    def dense_times(self, runtime: str | None = None) -> np.ndarray:
        """Each round's dense time in ``runtime`` (default: the reference)."""
        runtime = runtime or self.reference
        return self.dense_s if runtime == DENSE_PLAN else self.runtimes[runtime]

    def speedups(self, name: str, runtime: str | None = None) -> np.ndarray:
        """Each round's dense time (over ``runtime``, default the reference) over the pruned time
        (a slow spell hits both sides of a ratio alike)."""
        return self.dense_times(runtime) / self.times[name]

    def speedups_by_runtime(self, name: str) -> dict[str, np.ndarray]:
        """:meth:`speedups` over every dense runtime measured, the dense plan included."""
        return {rt: self.speedups(name, rt) for rt in (*self.runtimes, DENSE_PLAN)}

    def dense_medians(self) -> dict[str, float]:
        return {rt: float(np.median(self.dense_times(rt))) for rt in (DENSE_PLAN, *self.runtimes)}

    def time(self, name: str) -> float:
        return float(np.median(self.times[name]))

    @property
    def dense(self) -> float:
        """The dense plan's median time."""
        return float(np.median(self.dense_s))


def measure_rounds(
    profile: Profile, bundle: ModelBundle, backend: Any, database: Any, solutions: Mapping[str, Solution],
    rounds: int = 1, runtimes: DenseRuntimes | None = None, reference: str = DENSE_PLAN,
    extra: Sequence[Mapping[str, Any]] = (),
) -> Rounds:
    """Time the dense model, each solution's pruned model and the base, interleaved, end to end,
    in ``rounds`` full interleaved measurements; all in the inference form the profile timed
    (:attr:`ModelBundle.inference`, BatchNorms folded). The dense ``runtimes`` (torch eager,
    ONNX Runtime; built for that inference form) are timed in the same rounds
    (:func:`~spdy.profilers.dense_runtimes.time_with_runtimes`); speedups are over ``reference``.
    ``extra`` backend plans are timed in the same rounds too (``Rounds.extra_s``). Every model's turn
    in a round is a block of calls in a row, as a deployed model runs in a loop of its own
    (:meth:`~spdy.profilers.TimingPolicy.for_models`): called one by one among the others, each model
    ran in the caches the one before it left, the dense ones most, and the speedups read high."""
    from spdy.profilers import STANDIN, LayerChoice, backend_plan

    names = list(solutions)
    weight = _weights(bundle, database)
    timed = bundle.inference
    dense = profile.table.solution(np.zeros(len(profile.table.layers), dtype=np.int64))
    plans = [backend_plan(s, weight, timed.model) for s in (dense, *(solutions[n] for n in names))]
    plans += list(extra)
    plans.append({n: LayerChoice(STANDIN) for n in profile.table.layers})
    per_plan, per_runtime = time_with_runtimes(backend, timed, plans, runtimes, rounds, blocks=True)
    arr = np.array([[tm.median_s for tm in row] for row in per_plan])
    rt = {n: np.array([r[n].median_s for r in per_runtime]) for n in per_runtime[0]} if per_runtime else {}
    if reference != DENSE_PLAN and reference not in rt:
        raise InvalidInputError(f"the reference {reference!r} was not measured (runtimes: {sorted(rt)})")
    return Rounds(arr[:, 0], {n: arr[:, 1 + i] for i, n in enumerate(names)}, arr[:, -1], rt, reference,
                  arr[:, 1 + len(names):-1] if extra else None)


def measure_speedups(
    profile: Profile, bundle: ModelBundle, backend: Any, database: Any, solutions: Mapping[str, Solution],
    rounds: int = 1,
) -> tuple[float, dict[str, float], float, dict[str, float]]:
    """:func:`measure_rounds` as medians over the rounds: ``(dense_s, {name: pruned_s}, base_s, {name: speedup})``."""
    r = measure_rounds(profile, bundle, backend, database, solutions, rounds)
    return (r.dense, {n: r.time(n) for n in solutions}, float(np.median(r.base_s)),
            {n: float(np.median(r.speedups(n))) for n in solutions})


def pooled(outcome: Outcome, time_s: float, samples: Sequence[float], dense_s: float, percentile: float,
           keep: bool, by_runtime: Mapping[str, Sequence[float]] | None = None) -> Outcome:
    """``outcome`` with a new measurement: its speedup samples (over the reference; ``by_runtime``:
    over each dense runtime) pooled with the earlier ones (``keep``: the same model measured
    again) or started afresh, and ``measured_speedup`` the ``percentile`` of the pool (and
    ``runtime_speedups`` those of each runtime's pool)."""
    pool = (tuple(outcome.speedup_samples) if keep else ()) + tuple(float(s) for s in samples)
    new = {rt: tuple(float(x) for x in v) for rt, v in (by_runtime or {}).items()}
    old = dict(outcome.runtime_samples) if keep else {}
    rt_pools = {rt: tuple(old.get(rt, ())) + new.get(rt, ()) for rt in {**old, **new}}
    return dataclasses.replace(outcome, measured_time_s=time_s, dense_time_s=dense_s, speedup_samples=pool,
                               measured_speedup=float(np.percentile(pool, percentile)), runtime_samples=rt_pools,
                               runtime_speedups={rt: float(np.percentile(v, percentile)) for rt, v in rt_pools.items()})


def unreachable(ref: Reference, target: float, max_speedup: float) -> InfeasibleBudgetError:
    """The error for ``target`` over the measured reference ``ref`` when the profile reaches at most
    ``max_speedup`` over the dense plan: the largest target to ask for, or, where the dense plan
    alone is fast enough but no pruned model is faster than it, that there is nothing to prune for."""
    top = ref.over_reference(max_speedup)
    if top >= target:  # the search prunes only for at least MIN_DP_TARGET over the dense plan
        return InfeasibleBudgetError(
            f"{target:g}x over {ref.label} needs no pruning here: the dense plan alone runs {ref.over_reference(1.0):.2f}x "
            f"faster than {ref.label} (measured side by side), and no pruned model in the profile runs {MIN_DP_TARGET:g}x "
            f"faster than the dense plan, the least the search prunes for (at most {max_speedup:.3f}x). Deploy the "
            "model unpruned on spdy's runtime, or profile it at a larger batch, where pruned layers can pay.",
            max_speedup=top)
    return InfeasibleBudgetError(
        f"{target:g}x over {ref.label} is out of reach: the profile reaches at most {max_speedup:.3f}x over the "
        f"dense plan, and {ref.label} runs the dense model in {ref.ratio:.2f}x the dense plan's time (measured side "
        f"by side), so at most {top:.2f}x over {ref.label}. Ask for at most {top:.2f}x.", max_speedup=top)


def reachable_over(profile: Profile, bundle: ModelBundle, backend: Any, runtimes: DenseRuntimes | None, asked: str,
                   patterns: Sequence[str], target: float, buckets: int, rounds: int = 3) -> Reference:
    """Before the database is built: the reference ``asked`` for, its time ratio to the dense plan
    measured side by side in ``rounds`` rounds of the dense models (unmeasured without ``runtimes``), and
    whether the profile reaches ``target`` over it; :class:`InfeasibleBudgetError` with the largest
    target over the reference otherwise. The latency check measures the ratio again for the DP."""
    ref = Reference.unmeasured(asked)
    if runtimes is not None:
        r = measure_rounds(profile, bundle, backend, None, {}, rounds=rounds, runtimes=runtimes)
        ref = Reference.from_rounds(asked, r.dense_s, r.runtimes, runtimes.unavailable)
        log.info("speedups %s", ref.describe())
    try:
        check_reachable(profile, patterns, ref.dp_speedup(target), buckets)
    except InfeasibleBudgetError as exc:
        if not ref.measured or exc.max_speedup is None:
            raise
        raise unreachable(ref, target, exc.max_speedup) from None
    return ref


#: How far the machine's state may move since the profile (:func:`spdy.profilers.state_shift`)
#: before the latency check warns.
STATE_SHIFT_WARN = 0.1
#: The lowest latency correction applied (the DP never aims more than 10% below the target).
MIN_CORRECTION = 0.9


def correction_factor(ratios: Sequence[float]) -> float:
    """The latency correction from the measured-to-predicted ratios (see :func:`latency_correction`)."""
    if not ratios:
        return 1.0
    q = float(np.median(ratios))
    if q < 1.0:
        q = min(1.0, max(MIN_CORRECTION, float(max(ratios))))
    return q


def latency_correction(
    profile: Profile, bundle: ModelBundle, backend: Any, database: Any, target: float, buckets: int = dp.DEFAULT_BUCKETS,
    rounds: int = 3, *, runtimes: DenseRuntimes | None = None, reference: str = FASTEST, probes: bool = True,
) -> tuple[float, dict[str, Any]]:
    """How much the additive latency model over-predicts the speedup of models pruned for ``target``.

    Times, end to end and interleaved with the dense model, two pruned models that meet
    ``target`` in the profile (the DP with SPDY's prior, and uniform sparsity), and returns
    ``r = (measured / predicted pruned time) / (measured / predicted dense time)`` for each, with
    the measurements (``rounds`` interleaved rounds, medians). Searching for ``target * q`` then
    makes the measured speedup meet ``target``:

    * ``q = median(r)`` when that is at least 1: the pruned models ran slower than predicted
      (on some 2-core machines the sparse layers ran 10-15% slower inside the model than alone,
      caches shared with the rest of the forward pass), so the DP must aim higher;
    * ``q = max(r)``, at most 1 and at least ``MIN_CORRECTION``, when both ran *faster* than
      predicted (seen on faster machines of the same kind: 5-13% faster): the DP may aim lower
      and keep accuracy, but only by the least optimistic of the two, so that noise in one
      check does not push the measured speedup under the target.

    ``target`` is a speedup over the dense plan (the DP's terms). With ``runtimes``, the same
    rounds time the dense model in torch eager, torch.compile and ONNX Runtime, and ``info["reference"]`` is
    the :class:`~spdy.reference.Reference` asked for (``reference``), with its time ratio to the
    dense plan measured side by side. ``probes=False`` times no pruned model (factor 1).
    With ``probes``, the same rounds also time the profile's state probes
    (:func:`~spdy.profilers.state_probe_plans`): ``info["state_shift"]`` says how far the
    machine's state moved since the profile, with a warning past :data:`STATE_SHIFT_WARN`.
    """
    table = profile.table
    sols = {}
    if probes:
        sols["prior"] = dp.solve(table, dp.prior_errors(len(table.layers), len(table.grid)), target, buckets)
        try:
            sols["uniform"] = uniform(table, target)
        except InfeasibleBudgetError:
            pass
    from spdy.profilers import state_probe_plans, state_shift

    state, then = state_probe_plans(profile, bundle) if probes else ([], np.array([]))
    r = measure_rounds(profile, bundle, backend, database, sols, rounds=rounds, runtimes=runtimes, extra=state)
    dense_s, base_s = r.dense, float(np.median(r.base_s))
    dense_ratio = dense_s / table.dense_total_s
    ratios = {n: (r.time(n) / sol.predicted_time_s) / dense_ratio for n, sol in sols.items()}
    q = correction_factor(list(ratios.values()))
    info: dict[str, Any] = {
        "factor": q, "ratios": ratios, "rounds": rounds, "dense_measured_s": dense_s,
        "dense_predicted_s": table.dense_total_s, "base_measured_s": base_s, "base_profile_s": table.base_s,
        "pruned": {n: {"measured_s": r.time(n), "predicted_s": sols[n].predicted_time_s} for n in sols}}
    if runtimes is not None:
        ref = Reference.from_rounds(reference, r.dense_s, r.runtimes, runtimes.unavailable)
        info["reference"] = ref.to_json()
        log.info("speedups %s", ref.describe())
    if probes:
        log.info("latency model check at %.3gx over the dense plan: pruned/dense measured-to-predicted ratios %s -> "
                 "correction %.3f",
                 target, {n: round(x, 3) for n, x in ratios.items()}, q)
    if r.extra_s is not None:
        shift = float(np.median([state_shift(row, then) for row in r.extra_s]))
        info["state_shift"] = shift
        if abs(shift - 1) > STATE_SHIFT_WARN:
            log.warning("the models the profile timed as state probes now take %.2fx the share of the dense model "
                        "they took while it was measured: the machine is in another state (a neighbour's load, "
                        "memory bandwidth), and the table's trade-offs between layers were priced in the old one. "
                        "The latency check corrects the speed; for the trade-offs, profile again in the state you "
                        "deploy in (spdy profile --force, or delete the cached profile)", shift)
    return q, info


def lowest_dp_target(target: float) -> float:
    """The lowest DP target aimed at for ``target`` when pruned models run faster than
    predicted (the latency check, the fit): never more than half of the asked-for gain."""
    return 1.0 + (target - 1.0) / 2


def dp_target_for(target: float, factor: float, reference: Reference) -> float:
    """The DP's target (a speedup over the dense plan) for ``target`` over ``reference``, with the
    latency correction ``factor``: ``target * factor`` (at least :func:`lowest_dp_target` when the
    factor lowers it) over the reference, divided by the reference's time ratio to the dense plan."""
    over_ref = max(target * factor, lowest_dp_target(target)) if factor < 1 else target * factor
    return reference.dp_speedup(over_ref)


def largest_target(max_speedup: float, factor: float, reference: Reference) -> float:
    """The largest target over ``reference`` whose DP target (:func:`dp_target_for`) a profile that
    reaches ``max_speedup`` over the dense plan can still meet."""
    top = max_speedup * reference.ratio
    return top / factor if factor >= 1 else min(top / factor, 2 * top - 1)


#: A pruned model measured within ``FIT_BAND`` x the target is kept as it is; outside it,
#: :func:`fit_to_measured` re-solves its budget, aiming at ``FIT_AIM`` x the target.
FIT_BAND = (0.99, 1.03)
FIT_AIM = 1.01
#: How much more a shortfall under :data:`FIT_BAND` weighs than an overshoot over it when the
#: fit compares a too-slow model with a tighter proposal (:func:`_fit_verdict`).
SHORTFALL_WEIGHT = 3.0


def fit_to_measured(
    target: float,
    outcomes: Mapping[str, Outcome],
    dp_targets: Mapping[str, float],
    resolve: Callable[[str, float], Outcome],
    measure: Callable[[dict[str, Solution]], Mapping[str, tuple[float, float, float]]],
    max_speedup: float,
    rounds: int = 2,
    percentile: float = 50.0,
    reference_ratio: float = 1.0,
) -> tuple[dict[str, Outcome], dict[str, float], list[dict[str, Any]]]:
    """Close the loop on each pruned model's measured speedup.

    The latency check before the search corrects the DP's target from two probe models;
    the model the search picks can still measure a few percent off (machine noise, a
    different mix of kernels). Here each measured ``outcome`` outside ``FIT_BAND`` x
    ``target`` is solved again by its own method (``resolve``) for its DP target scaled
    by ``FIT_AIM * target / measured``, clipped to ``[1 + (target - 1) / 2, max_speedup]`` (the lower
    end divided by ``reference_ratio``: measured speedups are over a reference runtime whose dense
    time is that ratio of the dense plan's, DP targets over the dense plan; at least ``MIN_DP_TARGET``).
    Each round measures every proposal *together with the model it would replace*,
    interleaved with the dense model, and decides on that measurement alone, so that one
    slow spell of a shared machine cannot move a model on its own:

    * the current model re-measures within the band: it stays (the first measurement was
      off), with the new measurement;
    * it re-measures too slow: the tighter proposal is taken if it measures faster and lands
      nearer the band, a shortfall under it weighing ``SHORTFALL_WEIGHT`` times an overshoot
      over it (a model 0.5% short is not traded for one 15% over: the proposal was sized
      from the first, lower reading); if it is not taken, the next round tries halfway
      between the two;
    * it re-measures too fast: a looser proposal is taken only if it measures at least
      ``FIT_BAND[0]`` x ``target`` (else the next round tries halfway between the two); a
      tighter one (made from a reading that was too slow) never.

    ``resolve(name, dp_target)`` returns the unmeasured outcome (solution and calibration
    loss) for that budget (for SPDY, :meth:`spdy.sensitivity.Search.refine`);
    ``measure({key: solution})`` returns ``{key: (time_s, speedup, dense_time_s)}``, or with a
    fourth item, that measurement's per-round speedups (and a fifth: ``{runtime: per-round
    speedups}`` over each dense runtime). A model kept pools them with its
    earlier ones and its measured speedup becomes their ``percentile`` (:func:`pooled`);
    the decision itself rests on the ``percentile`` of this measurement's speedups alone.
    Returns the outcomes, their DP targets and one record per proposal.
    """
    outs, dpt = dict(outcomes), dict(dp_targets)
    low, high = FIT_BAND[0] * target, FIT_BAND[1] * target
    log_: list[dict[str, Any]] = []
    too_loose: dict[str, float] = {}  # per model: the loosest DP target that measured short
    too_tight: dict[str, float] = {}  # per model: the tightest DP target that overshot, not taken
    for rnd in range(max(0, rounds)):
        proposals = _fit_proposals(target, outs, dpt, too_loose, resolve, max_speedup, reference_ratio, too_tight)
        if not proposals:
            break
        sols: dict[str, Solution] = {}
        for n, (_, c) in proposals.items():
            sols[f"{n}@current"] = outs[n].solution
            sols[n] = c.solution
        got = measure(sols)
        for name, (new_t, cand) in proposals.items():
            cand, sp = _remeasured(cand, got[name], percentile, keep=False)
            old, cs = _remeasured(outs[name], got[f"{name}@current"], percentile, keep=True)
            accepted, why = _fit_verdict(low, high, cs, sp, new_t, dpt[name])
            log_.append({"round": rnd + 1, "method": old.method, "from_dp_target": dpt[name], "dp_target": new_t,
                         "from_measured": outs[name].measured_speedup, "remeasured": cs, "measured": sp,
                         "predicted": cand.solution.predicted_speedup, "calibration_loss": cand.calibration_loss,
                         "accepted": accepted, "why": why})
            log.info("fit %s: measured %.3fx for %gx (re-measured %.3fx) -> DP target %.3f -> measured %.3fx: %s (%s)",
                     old.method, outs[name].measured_speedup, target, cs, new_t, sp,
                     "taken" if accepted else "kept the current", why)
            if accepted:
                outs[name], dpt[name] = cand, new_t
            else:
                outs[name] = old
                if new_t < dpt[name] and cs > high:
                    too_loose[name] = new_t
                if new_t > dpt[name] and cs < low and sp > high:
                    too_tight[name] = new_t
    return outs, dpt, log_


def _remeasured(o: Outcome, got: Sequence[Any], percentile: float, keep: bool) -> tuple[Outcome, float]:
    """``o`` with the measurement ``got`` (:func:`fit_to_measured`'s ``measure`` item) and that
    measurement's own speedup (the ``percentile`` of its rounds)."""
    t_s, sp, dense_s = got[0], got[1], got[2]
    samples = got[3] if len(got) > 3 else (sp,)
    by_runtime = got[4] if len(got) > 4 else None
    return (pooled(o, t_s, samples, dense_s, percentile, keep, by_runtime=by_runtime),
            float(np.percentile(samples, percentile)))


def _fit_proposals(
    target: float, outs: Mapping[str, Outcome], dpt: Mapping[str, float], too_loose: Mapping[str, float],
    resolve: Callable[[str, float], Outcome], max_speedup: float, reference_ratio: float = 1.0,
    too_tight: Mapping[str, float] | None = None,
) -> dict[str, tuple[float, Outcome]]:
    """One round's proposals of :func:`fit_to_measured`: ``{name: (new DP target, unmeasured outcome)}``
    for each model measured outside the band whose re-solved levels differ from its current ones.
    ``too_loose`` / ``too_tight``: per model, the loosest DP target that measured short / the
    tightest that overshot more than the current model fell short; a proposal beyond one of them
    goes halfway to it instead."""
    too_tight = too_tight or {}
    low, high = FIT_BAND[0] * target, FIT_BAND[1] * target
    floor = max(lowest_dp_target(target) / reference_ratio, MIN_DP_TARGET)
    proposals: dict[str, tuple[float, Outcome]] = {}
    for name, o in outs.items():
        s = o.measured_speedup
        if s is None or not math.isfinite(s) or low <= s <= high:
            continue
        new_t = min(max(dpt[name] * FIT_AIM * target / s, floor), max_speedup * (1 - 1e-3))  # DP buckets: not the edge itself
        if name in too_loose and new_t < dpt[name]:
            new_t = max(new_t, (dpt[name] + too_loose[name]) / 2)  # bisect towards the last one that measured short
        if name in too_tight and new_t > dpt[name]:
            new_t = min(new_t, (dpt[name] + too_tight[name]) / 2)  # bisect towards the last one that overshot
        if abs(new_t - dpt[name]) <= 1e-6 * dpt[name]:
            continue  # already at the edge of what the profile allows
        try:
            cand = resolve(name, new_t)
        except InfeasibleBudgetError:
            continue
        if np.array_equal(cand.solution.levels, o.solution.levels):
            continue
        proposals[name] = (new_t, cand)
    return proposals


def _fit_verdict(low: float, high: float, current: float, proposed: float, new_t: float, cur_t: float) -> tuple[bool, str]:
    """Whether :func:`fit_to_measured` takes a proposal (DP target ``new_t``, measured ``proposed``)
    over the current model (DP target ``cur_t``, re-measured ``current``), and why."""
    if low <= current <= high:
        return False, "the current model re-measured within the band"
    if current < low:
        if not (new_t > cur_t and proposed > current):
            return False, "not faster than the current model"
        if _band_miss(proposed, low, high) >= _band_miss(current, low, high):
            return False, "overshoots the band more than the current model falls short"
        return True, "faster than the current model"
    # too fast: only a looser budget that still meets the target replaces it
    accepted = new_t < cur_t and proposed >= low
    return accepted, ("still meets the target" if accepted else
                      "too slow" if new_t < cur_t else "the current model re-measured faster than the target")


def _band_miss(speedup: float, low: float, high: float) -> float:
    """How far ``speedup`` lies outside ``[low, high]``, relative; a shortfall weighs ``SHORTFALL_WEIGHT``."""
    if speedup < low:
        return SHORTFALL_WEIGHT * (low / speedup - 1)
    return max(speedup / high - 1, 0.0)


def check_latency(
    prepared: Prepared,
    target: float,
    buckets: int,
    settings: MeasureConfig,
    *,
    storage: str | None,
    study_name: str,
    resume: bool,
    progress: Progress | None,
    reference: Reference | None = None,
    runtimes: DenseRuntimes | None = None,
) -> tuple[dict[str, Any] | None, float]:
    """The latency check before the search and the DP target it gives: ``(correction, dp_target)``.

    With ``resume``, a correction stored with the study (a resumed or shared search) is
    reused; else, with ``settings.measure``, it is measured by :func:`latency_correction`
    (the pruned probes only with ``settings.calibrate``; the dense ``runtimes`` always, and
    ``correction["reference"]`` is the reference asked for, measured there). ``reference``
    says which one is asked for, and holds an earlier estimate of its ratio to the dense
    plan that sets the probes' target (default: nothing measured, the dense plan). The DP aims
    at :func:`dp_target_for`; a DP target past the profile's reach raises
    :class:`InfeasibleBudgetError` with the largest target that can be asked for.
    """
    table = prepared.table
    ref = reference or Reference.unmeasured(FASTEST)
    correction = _stored_correction(storage, study_name) if resume else None
    if correction is not None:
        _check_stored_reference(correction, ref, runtimes, study_name)
    elif settings.measure and (settings.calibrate or runtimes is not None):
        if progress:
            progress("calibrate", 0, 1, "latency model vs end-to-end")
        q, correction = latency_correction(prepared.profile, prepared.bundle, prepared.backend, prepared.database,
                                           ref.dp_speedup(target), buckets, runtimes=runtimes, reference=ref.asked,
                                           probes=settings.calibrate)
        if progress:
            progress("calibrate", 1, 1, f"x{q:.3f}")
    q = float(correction["factor"]) if correction else 1.0
    if correction and "reference" in correction:
        ref = Reference.from_json(correction["reference"])
    dp_target = dp_target_for(target, q, ref)
    if dp_target > table.max_speedup():
        top = largest_target(table.max_speedup(), q, ref)
        why = [f"{ref.label} runs the dense model in {ref.ratio:.2f}x the dense plan's time (measured side by side)"
               ] if ref.measured else []
        if q != 1:
            why.append(f"pruned models ran {q:.2f}x {'slower' if q > 1 else 'faster'} than the latency model predicts")
        raise InfeasibleBudgetError(
            f"{target:g}x over {ref.label} is out of reach end to end: {' and '.join(why) or 'the profile says so'}, "
            f"so the DP would need {dp_target:.3f}x over the dense plan of a profile that reaches at most "
            f"{table.max_speedup():.3f}x. Ask for at most {top:.2f}x.",
            max_speedup=top,
        )
    return correction, dp_target


def _check_stored_reference(correction: Mapping[str, Any], ref: Reference, runtimes: DenseRuntimes | None,
                            study_name: str) -> None:
    """A stored correction must have been measured against the reference asked for now."""
    stored = correction.get("reference")
    if stored is None:
        if not ref.measured:
            return
        raise InvalidInputError(
            f"the study {study_name!r} was calibrated with speedups over the dense plan, not over a dense reference "
            f"runtime (--reference {ref.asked}); start a new study (another -o folder, or --study NAME)")
    if stored.get("asked") != ref.asked:
        raise InvalidInputError(
            f"the study {study_name!r} holds a search for speedups over --reference {stored.get('asked')}; pass "
            f"--reference {stored.get('asked')} to resume or join it, or start a new study (another -o folder, or --study)")
    if runtimes is not None and stored.get("runtime") not in (DENSE_PLAN, *runtimes.runtimes):
        raise InvalidInputError(
            f"the study {study_name!r} states speedups over {stored.get('label')}, which cannot run this model here "
            f"({runtimes.unavailable.get(str(stored.get('runtime')), '')}); start a new study")


def _stored_correction(storage: str | None, study_name: str) -> dict[str, Any] | None:
    """The latency correction stored with the study ``study_name``, or None (no storage, no such study)."""
    if storage is None:
        return None
    import optuna

    from spdy.sensitivity import make_storage

    try:
        st = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    except KeyError:  # optuna's storages raise KeyError for a study they do not hold
        return None
    got = st.user_attrs.get("latency_correction")
    return dict(got) if isinstance(got, dict) else None


def baseline(name: str, table: Any, bundle: ModelBundle, target: float, objective: CalibrationObjective) -> Outcome:
    """The one-shot baseline ``name`` (``uniform`` or ``global`` magnitude) for ``target``, with its loss."""
    if name == "uniform":
        sol = uniform(table, target)
    else:
        weights = {n: get_module(bundle.model, n).weight.detach().float().numpy() for n in table.layers}
        sol = global_magnitude(table, weights, target)
    return Outcome(name, sol, objective(sol.levels))


def measure_and_fit(
    prepared: Prepared,
    objective: CalibrationObjective,
    target: float,
    dp_target: float,
    best: Outcome,
    baselines: Mapping[str, Outcome | str],
    settings: MeasureConfig,
    *,
    searcher: Any | None,
    only_baseline: str | None,
    eval_threads: int | None,
    progress: Progress | None,
    reference: Reference | None = None,
    runtimes: DenseRuntimes | None = None,
) -> Measured:
    """Time the dense model, SPDY's answer ``best`` and the ``baselines`` end to end, then fit
    SPDY's answer to its measurements (:func:`fit_to_measured`, ``settings.fit_rounds`` times at
    most) and solve the baselines for the DP target it ended at (:func:`_fit`).

    Every measurement also times the dense ``runtimes``; speedups are over ``reference`` (from
    the latency check; default the dense plan), whose time ratio to the dense plan converts
    the fit's targets into the DP's terms. SPDY's answer for a new budget comes from ``searcher``
    (:meth:`spdy.sensitivity.Search.refine`); without one (``only_baseline``), ``best`` is that
    baseline and re-solves by its rule. With ``--reference fastest``, when another dense runtime
    ran the dense model clearly faster than the reference in the fit's rounds
    (:func:`faster_reference`), the target is held to it from there: SPDY's answer and the
    baselines are read over it and the fit runs once more (its records carry ``"reference"``),
    and the returned :attr:`Measured.reference` is that runtime. A model measured below
    ``SPEEDUP_TOLERANCE`` x ``target`` is explained in a warning.
    """
    prof, table = prepared.profile, prepared.table
    ref = reference or Reference.unmeasured(FASTEST)
    stage: dict[str, float] = {}
    t0 = time.perf_counter()
    if progress:
        progress("measure", 0, 1, "dense and pruned models end to end")
    sols = {"__best__": best.solution, **{n: o.solution for n, o in baselines.items() if isinstance(o, Outcome)}}
    r = measure_rounds(prof, prepared.bundle, prepared.backend, prepared.database, sols, rounds=settings.measure_rounds,
                       runtimes=runtimes, reference=ref.runtime)
    drift = float(np.median(r.base_s)) / table.base_s - 1 if table.base_s > 0 else float("nan")

    def measured(o: Outcome, key: str) -> Outcome:
        return pooled(o, r.time(key), r.speedups(key), r.dense, settings.percentile, keep=False,
                      by_runtime=r.speedups_by_runtime(key))

    best = measured(best, "__best__")
    base_out = {n: measured(o, n) if isinstance(o, Outcome) else o for n, o in baselines.items()}
    stage["measure"] = time.perf_counter() - t0
    fit_log: list[dict[str, Any]] = []
    switch_notes: tuple[str, ...] = ()
    if settings.fit_rounds > 0:
        t0 = time.perf_counter()
        refine = (lambda t: searcher.refine(t, evals=settings.fit_evals)[1:]) if searcher is not None else None
        best, base_out, fit_log, dp_final = _fit(prepared, objective, target, best, base_out, dp_target, settings,
                                                 refine, only_baseline, eval_threads, runtimes, ref)
        switched = faster_reference(best, ref)
        if switched is not None:
            # the fastest runtime at the latency check was not the fastest over the run: hold the
            # target to the one that was, and fit again against it
            msg = (f"{switched.label} ran the dense model faster than {ref.label} in this run's end-to-end rounds "
                   f"(the pruned model {best.runtime_speedups[switched.runtime]:.2f}x over it, "
                   f"{best.measured_speedup:.2f}x over {ref.label}): the target is held to {switched.label} from here")
            log.warning(msg)
            switch_notes += (msg,)
            ref = switched
            best = over_runtime(best, ref.runtime, settings.percentile)
            base_out = {n: over_runtime(o, ref.runtime, settings.percentile) if isinstance(o, Outcome) else o
                        for n, o in base_out.items()}
            best, base_out, more, dp_final = _fit(prepared, objective, target, best, base_out, dp_final, settings,
                                                  refine, only_baseline, eval_threads, runtimes, ref)
            fit_log += [{**rec, "reference": ref.runtime} for rec in more]
        if fit_log:
            stage["fit"] = time.perf_counter() - t0
    if progress:
        progress("measure", 1, 1, f"{best.measured_speedup:.2f}x")
    warnings: tuple[str, ...] = ref.warnings() + switch_notes
    if best.measured_speedup is not None and best.measured_speedup < SPEEDUP_TOLERANCE * target:
        msg = _explain_shortfall(target, best, best.dense_time_s, prof, drift, ref)
        warnings += (msg,)
        log.warning(msg)
    faster = faster_runtime_warning(target, best, ref)
    if faster:
        warnings += (faster,)
        log.warning(faster)
    return Measured(best, base_out, best.dense_time_s, drift, tuple(fit_log), stage, warnings, settings.percentile,
                    ref, r.dense_medians())


def _fit(
    prepared: Prepared, objective: CalibrationObjective, target: float, best: Outcome,
    base_out: dict[str, Outcome | str], dp_target: float, settings: MeasureConfig,
    refine: Callable[[float], tuple[Solution, float]] | None, only_baseline: str | None, eval_threads: int | None,
    runtimes: DenseRuntimes | None = None, reference: Reference | None = None,
) -> tuple[Outcome, dict[str, Outcome | str], list[dict[str, Any]], float]:
    """:func:`fit_to_measured` on the search's answer, then the baselines at its final DP target
    (returned last).

    SPDY's answer for a new budget comes from ``refine`` (:meth:`spdy.sensitivity.Search.refine`:
    the search's best coefficients re-evaluated and locally searched at that budget). When the
    fit moved it, each baseline is solved for the DP target it ended at and measured side by
    side with it (:func:`_match_baselines`): the comparison is at one budget and one moment of
    the machine, rather than each method chasing its own readings of a machine whose speed
    swings by 20% within minutes."""
    prof = prepared.profile
    outs: dict[str, Outcome] = {"__best__": best}

    def resolve(name: str, t: float) -> Outcome:
        prev = torch.get_num_threads()
        if eval_threads is not None:
            torch.set_num_threads(eval_threads)
        try:
            if name == "__best__" and refine is not None:
                sol, loss = refine(t)
                return Outcome("spdy", sol, loss)
            base = only_baseline if name == "__best__" else name
            return baseline(str(base), prof.table, prepared.bundle, t, objective)
        finally:
            torch.set_num_threads(prev)

    ref = reference or Reference.unmeasured(FASTEST)

    def measure(sols: dict[str, Solution]) -> dict[str, tuple[Any, ...]]:
        r = measure_rounds(prof, prepared.bundle, prepared.backend, prepared.database, sols,
                           rounds=settings.measure_rounds, runtimes=runtimes, reference=ref.runtime)
        return {n: (r.time(n), float(np.median(r.speedups(n))), r.dense, r.speedups(n), r.speedups_by_runtime(n))
                for n in sols}

    outs, dpt, fit_log = fit_to_measured(target, outs, {n: dp_target for n in outs}, resolve, measure,
                                         prof.table.max_speedup(), settings.fit_rounds, settings.percentile,
                                         reference_ratio=ref.ratio)
    best = outs.pop("__best__")
    base_out, best, matched = _match_baselines(best, dpt["__best__"], dp_target, base_out, resolve, measure,
                                               settings.percentile)
    fit_log += matched
    for rec in fit_log:
        rec["loss_evaluation_budget"] = settings.fit_evals if rec["method"] == "spdy" and refine is not None else 1
    return best, base_out, fit_log, dpt["__best__"]


def _match_baselines(
    best: Outcome, best_t: float, dp_target: float, base_out: dict[str, Outcome | str],
    resolve: Callable[[str, float], Outcome], measure: Callable[[dict[str, Solution]], Mapping[str, tuple[Any, ...]]],
    percentile: float,
) -> tuple[dict[str, Outcome | str], Outcome, list[dict[str, Any]]]:
    """Each baseline solved for ``best_t`` (the DP target SPDY's answer ended at; they were
    solved for ``dp_target``), measured side by side with SPDY's answer: (baselines, SPDY's
    answer with that measurement pooled, one record per baseline with ``"matched": True`` and
    ``"spdy_measured_same_rounds"``: SPDY's speedup in those rounds alone, the like-for-like
    comparison when the machine's speed moved during the run).
    Nothing to do when the fit left the DP target where it was."""
    names = [n for n, o in base_out.items() if isinstance(o, Outcome)]
    if not names or abs(best_t - dp_target) <= 1e-9 * dp_target:
        return base_out, best, []
    solved: dict[str, Outcome] = {}
    at: dict[str, float] = {}
    for n in names:
        try:
            solved[n], at[n] = resolve(n, best_t), best_t
        except InfeasibleBudgetError as exc:
            # out of its reach: its fastest model is the nearest to SPDY's budget it has, when nearer than before
            top = exc.max_speedup
            if top is not None and math.isfinite(top) and abs(math.log(top / best_t)) < abs(math.log(dp_target / best_t)):
                try:
                    solved[n], at[n] = resolve(n, top * (1 - 1e-9)), top
                    log.warning("%s cannot reach SPDY's final DP target %.3f; it is solved for the most it reaches, "
                                "%.3f", n, best_t, top)
                    continue
                except InfeasibleBudgetError:
                    pass
            log.warning("%s cannot be solved for SPDY's final DP target %.3f (%s); it keeps %.3f", n, best_t, exc,
                        dp_target)
    if not solved:
        return base_out, best, []
    got = measure({"__best__": best.solution, **{n: o.solution for n, o in solved.items()}})
    best, best_sp = _remeasured(best, got["__best__"], percentile, keep=True)
    out, records = dict(base_out), []
    for n, o in solved.items():
        out[n], sp = _remeasured(o, got[n], percentile, keep=False)
        reached = at[n] == best_t
        records.append({"round": None, "method": n, "matched": True, "from_dp_target": dp_target, "dp_target": at[n],
                        "spdy_dp_target": best_t,
                        "from_measured": base_out[n].measured_speedup, "remeasured": None, "measured": sp,
                        "spdy_measured_same_rounds": best_sp,
                        "predicted": o.solution.predicted_speedup, "calibration_loss": o.calibration_loss,
                        "accepted": True,
                        "why": ("solved for SPDY's final DP target" if reached else
                                "solved for the most it reaches, short of SPDY's final DP target")
                        + ", measured side by side with it"})
        log.info("%s solved for DP target %.3f (SPDY's: %.3f): measured %.3fx, loss %.5g", n, at[n], best_t, sp,
                 o.calibration_loss)
    return out, best, records


def _clearly_faster(outcome: Outcome, reference: Reference) -> str | None:
    """With ``--reference fastest``: the dense runtime over which ``outcome``'s pruned model measured
    the lowest speedup in the run's rounds, if that is below :data:`FASTER_RUNTIME_MARGIN` x its
    speedup over ``reference`` (that runtime ran the dense model clearly faster); else None."""
    if reference.asked != FASTEST or not reference.measured or not outcome.measured_speedup:
        return None
    others = {rt: s for rt, s in outcome.runtime_speedups.items()
              if rt not in (DENSE_PLAN, STATE_PROBE, reference.runtime)}
    if not others:
        return None
    rt = min(others, key=lambda k: others[k])
    return rt if others[rt] < FASTER_RUNTIME_MARGIN * outcome.measured_speedup else None


def faster_reference(outcome: Outcome, reference: Reference) -> Reference | None:
    """With ``--reference fastest``: the dense runtime that, over the run's end-to-end rounds of
    ``outcome``, ran the dense model clearly faster than ``reference`` (the pruned model's speedup
    over it below :data:`FASTER_RUNTIME_MARGIN` x the one over the reference), as the reference
    to hold the target to: its time ratio to the dense plan is the median of the rounds' ratios
    (each round's speedup over the runtime over the one over the dense plan). None when the
    reference stands, was named by the user, or nothing else was measured."""
    rt = _clearly_faster(outcome, reference)
    samples = outcome.runtime_samples
    if rt is None or DENSE_PLAN not in samples:
        return None
    over_rt, over_plan = np.asarray(samples[rt], dtype=np.float64), np.asarray(samples[DENSE_PLAN], dtype=np.float64)
    ratio = (float(np.median(over_rt / over_plan)) if len(over_rt) == len(over_plan)
             else float(np.median(over_rt) / np.median(over_plan)))
    return dataclasses.replace(reference, runtime=rt, ratio=ratio, ratios={**reference.ratios, rt: ratio})


def over_runtime(outcome: Outcome, runtime: str, percentile: float) -> Outcome:
    """``outcome`` with its speedups read over ``runtime`` (from its per-runtime pools) instead of
    the reference it was measured against."""
    pool = tuple(outcome.runtime_samples.get(runtime, ()))
    if not pool:
        return outcome
    return dataclasses.replace(outcome, speedup_samples=pool, measured_speedup=float(np.percentile(pool, percentile)))


def faster_runtime_warning(target: float, outcome: Outcome, reference: Reference) -> str | None:
    """With ``--reference fastest``: a line when, over the run's end-to-end rounds, another dense
    runtime ran the dense model clearly faster than the reference (the runtime the target and
    the fit were held to in the end: the fastest at the latency check, or the one
    :func:`measure_and_fit` switched to), so the pruned model's speedup over it is lower; None
    otherwise."""
    rt = _clearly_faster(outcome, reference)
    if rt is None:
        return None
    low, held = outcome.runtime_speedups[rt], outcome.measured_speedup
    band = outcome.speedup_summary(rt)
    spread = f" (p10-p90 {band['p10']:.2f}-{band['p90']:.2f}x over {band['rounds']} rounds)" if band else ""
    short = (f", below {SPEEDUP_TOLERANCE:.0%} of the {target:g}x target"
             if low < SPEEDUP_TOLERANCE * target else "")
    return (f"{LABELS[rt]} ran the dense model faster than {reference.label} in this run's end-to-end rounds: the "
            f"pruned model measured {low:.2f}x over {LABELS[rt]}{spread}{short}, against {held:.2f}x over "
            f"{reference.label}, the runtime the target was held to. Which dense "
            f"runtime is fastest changes with the machine's state; to hold the target to {LABELS[rt]}, search again "
            f"with --reference {rt}.")


def _explain_shortfall(target: float, outcome: Outcome, dense_s: float, profile: Profile, drift: float,
                       reference: Reference | None = None) -> str:
    t = profile.table
    pred, meas = outcome.solution.predicted_time_s, outcome.measured_time_s or float("nan")
    over = f" over {reference.label}" if reference is not None and reference.measured else ""
    parts = [
        f"measured speedup {outcome.measured_speedup:.2f}x{over} is below {SPEEDUP_TOLERANCE:.0%} of the {target:g}x "
        "target.",
        f"The pruned model took {meas * 1e3:.2f} ms against {pred * 1e3:.2f} ms predicted ({(meas / pred - 1) * 100:+.1f}%),"
        f" the dense model {dense_s * 1e3:.2f} ms against {t.dense_total_s * 1e3:.2f} ms predicted"
        f" ({(dense_s / t.dense_total_s - 1) * 100:+.1f}%).",
    ]
    if math.isfinite(drift) and abs(drift) > 0.05:
        parts.append(f"The non-prunable base runs {drift * 100:+.0f}% against the profile: the machine's speed changed "
                     "(other processes, frequency scaling). Re-run on a quiet machine or re-profile (delete the cached "
                     "profile or pass a new --profile path).")
    elif meas > pred * 1.05:
        parts.append("The additive latency model under-predicts this pruned model (layers interact through the "
                     "caches, or the sparse kernels were slower than when profiled). Re-profile with more passes, or "
                     "search for a slightly higher target.")
    else:
        parts.append("The dense model runs faster than the profile predicts, so the ratio shrinks; re-profile on a "
                     "quiet machine.")
    return " ".join(parts)

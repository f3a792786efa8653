"""The library API: :func:`search` runs SPDY end to end, :func:`apply` deploys its result.

``search`` chains the stages: a latency profile of the model on the backend
(measured once and cached per model + hardware), a reconstruction database
(built once and cached per model + calibration set), the sensitivity search
(DP -> stitch -> calibration loss, every evaluation an Optuna trial), the
one-shot baselines for the same budget, and an end-to-end measurement of the
pruned models on the backend. It returns a :class:`SearchOutcome`; with ``out``
it also writes ``result.json``, the pruned weights (``model/``) and a plot.

Cached work lives under ``$SPDY_CACHE`` (default ``~/.cache/spdy``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # before torch: torch and the spdy kernels then share one OpenMP pool
    import spdy.kernels  # noqa: F401
except ImportError:  # pragma: no cover - numba missing
    pass

import numpy as np
import torch
from torch import nn

from spdy import __version__, dp
from spdy.baselines import BASELINES, global_magnitude, uniform
from spdy.errors import InfeasibleBudgetError, InvalidInputError, ProfileMismatchError, SpdyError
from spdy.grid import DEFAULT_GRID, SparsityGrid
from spdy.hardware import VOLATILE_KEYS
from spdy.io import atomic_write_json, read_json
from spdy.models.base import ModelBundle, batchnorm_state, get_module, load_model, resolve_loss
from spdy.profile import Profile, load_profile, save_profile
from spdy.types import LayerSpec, Solution

log = logging.getLogger(__name__)

RESULT_SCHEMA = "spdy.search-result"
RESULT_SCHEMA_VERSION = 1
#: measured / target below this makes a search warn loudly
SPEEDUP_TOLERANCE = 0.95

#: ``progress(stage, done, total, info)``: ``stage`` is "profile", "database", "search" or "measure".
Progress = Callable[[str, int, int, str], None]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Outcome:
    """One per-layer sparsity profile (SPDY's or a baseline's) and how it did."""

    method: str
    solution: Solution
    calibration_loss: float
    formats: tuple[str, ...] = ()
    measured_time_s: float | None = None
    measured_speedup: float | None = None
    dense_time_s: float | None = None  # the dense model's time in the same measurement

    def layers(self) -> dict[str, dict[str, Any]]:
        out = {}
        for i, name in enumerate(self.solution.layers):
            lv = int(self.solution.levels[i])
            rec: dict[str, Any] = {"sparsity": float(self.solution.sparsities[i]), "level": lv,
                                   "pattern": "dense" if lv == 0 else "unstructured"}
            if self.formats:
                rec["format"] = self.formats[i]
            out[name] = rec
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "predicted_speedup": self.solution.predicted_speedup,
            "predicted_time_s": self.solution.predicted_time_s,
            "measured_speedup": self.measured_speedup,
            "measured_time_s": self.measured_time_s,
            "calibration_loss": self.calibration_loss,
            "layers": self.layers(),
        }


@dataclass(frozen=True)
class SearchOutcome:
    """What :func:`search` found: the chosen profile, the baselines and the measurements."""

    model: str
    backend: str
    target_speedup: float
    result: Outcome
    dense_loss: float
    baselines: dict[str, Outcome | str] = field(default_factory=dict)
    dense_measured_s: float | None = None
    base_drift: float | None = None
    n_evaluations: int = 0
    study: str = ""
    storage: str | None = None
    profile_path: str | None = None
    database_path: str | None = None
    stage_s: dict[str, float] = field(default_factory=dict)
    per_evaluation_ms: dict[str, float] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    out: str | None = None
    latency_correction: dict[str, Any] | None = None
    dp_target_speedup: float | None = None
    fit: tuple[dict[str, Any], ...] = ()

    @property
    def predicted_speedup(self) -> float:
        return self.result.solution.predicted_speedup

    @property
    def measured_speedup(self) -> float | None:
        return self.result.measured_speedup

    @property
    def calibration_loss(self) -> float:
        return self.result.calibration_loss

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return self.result.layers()

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": RESULT_SCHEMA,
            "schema_version": RESULT_SCHEMA_VERSION,
            "spdy_version": __version__,
            "model": self.model,
            "backend": self.backend,
            "method": self.result.method,
            "target_speedup": self.target_speedup,
            "predicted_speedup": self.predicted_speedup,
            "dp_target_speedup": self.dp_target_speedup,
            "latency_correction": self.latency_correction,
            "fit": list(self.fit),
            "measured_speedup": self.measured_speedup,
            "measured_time_s": self.result.measured_time_s,
            "dense_measured_time_s": self.dense_measured_s,
            "base_drift": self.base_drift,
            "calibration_loss": {"dense": self.dense_loss, "pruned": self.calibration_loss},
            "layers": self.layers,
            "baselines": {k: (v.to_json() if isinstance(v, Outcome) else {"error": v}) for k, v in self.baselines.items()},
            "search": {"evaluations": self.n_evaluations, "study": self.study, "storage": self.storage,
                       "per_evaluation_ms": self.per_evaluation_ms},
            "profile": self.profile_path,
            "database": self.database_path,
            "stage_seconds": self.stage_s,
            "settings": self.settings,
            "warnings": list(self.warnings),
            "fingerprint": self.fingerprint,
        }


# --------------------------------------------------------------------------- caches


def cache_dir() -> Path:
    """Where profiles and databases are cached: ``$SPDY_CACHE`` or ``~/.cache/spdy``."""
    return Path(os.environ.get("SPDY_CACHE") or Path.home() / ".cache" / "spdy")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name).strip("_")[:60] or "model"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stable_fingerprint(fp: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fp.items() if k not in VOLATILE_KEYS}


def profile_cache_path(bundle: ModelBundle, backend: Any, grid: SparsityGrid, specs: Sequence[LayerSpec]) -> Path:
    """The cached profile's path: model name, layer signature, grid, backend and hardware fingerprint."""
    key = _digest({"specs": [s.to_json() for s in specs], "grid": grid.to_json(),
                   "fingerprint": _stable_fingerprint(backend.fingerprint()), "settings": backend.settings()})
    return cache_dir() / "profiles" / f"{_safe(bundle.name)}-{backend.name}-t{backend.threads}-{key}.json"


def database_cache_path(bundle: ModelBundle, grid: SparsityGrid, method: str, specs: Sequence[LayerSpec]) -> Path:
    """The cached database's folder: model name, calibration set, grid, method and dense weights."""
    from spdy.database.store import weight_sha256

    weights = [weight_sha256(get_module(bundle.model, s.name).weight) for s in specs]
    key = _digest({"calibration": bundle.calibration_id, "grid": grid.to_json(), "method": method,
                   "specs": [s.to_json() for s in specs], "weights": weights})
    return cache_dir() / "databases" / f"{_safe(bundle.name)}-{method}-{key}"


# --------------------------------------------------------------------------- stages


def as_bundle(
    model: str | ModelBundle | nn.Module,
    calibration: Sequence[Any] | None = None,
    *,
    loss: str | Callable[..., Any] | None = None,
    forward: Callable[..., Any] | None = None,
    exclude: Sequence[str] = (),
    name: str | None = None,
    **model_kwargs: Any,
) -> ModelBundle:
    """A :class:`ModelBundle` from a model spec (``"minilm"``, ``"pkg.mod:factory"``), a bundle,
    or an ``nn.Module`` with its calibration batches."""
    if isinstance(model, ModelBundle):
        bundle = model
        if calibration is not None:
            bundle = dataclasses.replace(bundle, calibration=list(calibration), example=None, calibration_id="")
    elif isinstance(model, str):
        bundle = load_model(model, exclude=exclude, **model_kwargs)
        exclude = ()
        if calibration is not None:
            bundle = dataclasses.replace(bundle, calibration=list(calibration), example=None, calibration_id="")
    elif isinstance(model, nn.Module):
        if calibration is None:
            raise InvalidInputError(
                "a torch model needs calibration batches: spdy.search(model, calibration=[batch, ...], ...)"
            )
        kw: dict[str, Any] = {"name": name or type(model).__name__, "model": model, "calibration": list(calibration)}
        if forward is not None:
            kw["forward"] = forward
        bundle = ModelBundle(**kw)
    else:
        raise InvalidInputError(
            f"model must be a model name ('minilm'), 'package.module:factory', a ModelBundle or a torch.nn.Module; "
            f"got {type(model).__name__}"
        )
    changes: dict[str, Any] = {}
    if loss is not None:
        changes["loss"] = resolve_loss(loss)
    if forward is not None and not isinstance(model, nn.Module):
        changes["forward"] = forward
    if exclude:
        changes["exclude"] = tuple(bundle.exclude) + tuple(exclude)
    if name is not None and not isinstance(model, nn.Module):
        changes["name"] = name
    return dataclasses.replace(bundle, **changes) if changes else bundle


def ensure_profile(
    bundle: ModelBundle,
    backend: Any,
    *,
    path: str | os.PathLike[str] | None = None,
    grid: SparsityGrid = DEFAULT_GRID,
    specs: Sequence[LayerSpec] | None = None,
    force: bool = False,
    validate: int = 0,
    progress: Progress | None = None,
) -> tuple[Profile, Path, bool]:
    """Load the profile at ``path`` (or the cached one), or measure and write it there.

    Returns ``(profile, path, measured)``. A profile made for another model or on other
    hardware raises :class:`ProfileMismatchError` unless ``force``.
    """
    from spdy.profilers import profile_model, validate as validate_profile

    specs = list(specs) if specs is not None else bundle.layers()
    p = Path(path) if path is not None else profile_cache_path(bundle, backend, grid, specs)
    if p.exists():
        prof = load_profile(p, specs=specs, fingerprint=backend.fingerprint(), force=force)
        if prof.backend != backend.name:
            raise ProfileMismatchError(
                f"profile {str(p)!r} was measured with backend {prof.backend!r}, not {backend.name!r}; "
                f"pass --backend {prof.backend} or another --profile"
            )
        log.info("using profile %s", p)
        return prof, p, False
    log.info("measuring a latency profile of %s on %s (%d layers x %d levels) into %s",
             bundle.name, backend.name, len(specs), len(grid), p)
    cb = (lambda d, t, w: progress("profile", d, t, w)) if progress else None
    prof = profile_model(bundle, backend, grid, specs=specs, progress=cb)
    if validate:
        prof = prof.with_validation(validate_profile(prof, bundle, backend, k=validate))
    p.parent.mkdir(parents=True, exist_ok=True)
    save_profile(prof, p)
    return prof, p, True


def ensure_database(
    bundle: ModelBundle,
    *,
    path: str | os.PathLike[str] | None = None,
    grid: SparsityGrid = DEFAULT_GRID,
    method: str = "obs",
    specs: Sequence[LayerSpec] | None = None,
    progress: bool = False,
) -> Any:
    """Open the database at ``path`` (or the cached one), building or resuming it if needed."""
    from spdy.database import Database, build_database

    specs = list(specs) if specs is not None else bundle.layers()
    p = Path(path) if path is not None else database_cache_path(bundle, grid, method, specs)
    if (p / "manifest.json").exists():
        db = Database.open(p, require_complete=False)
        if not db.missing:
            db.check_compatible(bundle, grid)
            if db.method != method and path is None:
                raise ProfileMismatchError(f"cached database {p} holds method {db.method!r}, not {method!r}")
            log.info("using database %s (%s)", p, db.method)
            return db
        db.close()
    log.info("building the %s reconstruction database of %s into %s", method, bundle.name, p)
    return build_database(bundle, p, grid, method=method, progress=progress)


class CalibrationObjective:
    """``levels -> calibration loss``: stitch a working copy from the database, run the calibration set.

    The dense model's outputs are computed once. A model with BatchNorm gets its running
    statistics re-estimated after each stitch (``bundle.tune_batchnorm``). Times spent stitching and evaluating
    are accumulated in ``stitch_s`` and ``loss_s`` (``calls`` evaluations).
    """

    def __init__(self, bundle: ModelBundle, database: Any, layers: Sequence[str]) -> None:
        self.bundle = bundle
        self.db = database
        self.layers = tuple(layers)
        t0 = time.perf_counter()
        self.dense_outputs = bundle.outputs()
        self.work = copy.deepcopy(bundle.model).eval()
        self.dense_loss = bundle.calibration_loss(bundle.model, self.dense_outputs)
        self.dense_s = time.perf_counter() - t0
        self.stitch_s = self.loss_s = 0.0
        self.calls = 0

    def __call__(self, levels: np.ndarray) -> float:
        t0 = time.perf_counter()
        self.db.stitch(self.work, {n: int(lv) for n, lv in zip(self.layers, levels)})
        t1 = time.perf_counter()
        self.bundle.retune_batchnorm(self.work)  # counted in loss_s: one more pass over the calibration set
        loss = self.bundle.calibration_loss(self.work, self.dense_outputs)
        self.stitch_s += t1 - t0
        self.loss_s += time.perf_counter() - t1
        self.calls += 1
        return float(loss)


def _plan(profile: Profile, bundle: ModelBundle, database: Any, levels: Sequence[int] | None) -> dict[str, Any]:
    """The backend plan running each layer at its level (None: unpruned) in the profile's format."""
    from spdy.profilers import DENSE, LayerChoice

    t = profile.table
    plan = {}
    for li, name in enumerate(t.layers):
        mod = get_module(bundle.model, name)
        bias = None if getattr(mod, "bias", None) is None else mod.bias.detach().float().numpy().copy()
        lv = 0 if levels is None else int(levels[li])
        fmt = profile.formats[li][lv] if profile.formats is not None else DENSE
        if levels is None or lv == 0:
            w = mod.weight.detach().float().numpy().copy()
        else:
            w = np.array(database.weight(name, lv), dtype=np.float32)
        plan[name] = LayerChoice(fmt, w, bias, float(t.grid[lv]))
    return plan


def measure_speedups(
    profile: Profile, bundle: ModelBundle, backend: Any, database: Any, solutions: Mapping[str, Solution],
    rounds: int = 1,
) -> tuple[float, dict[str, float], float, dict[str, float]]:
    """Time the dense model, each solution's pruned model and the base, interleaved, end to end.

    With several ``rounds`` (each a full interleaved measurement) the times are medians over
    the rounds, and so are the speedups (each round's dense time over its pruned time: a
    slow spell of the machine then hits both sides of a ratio alike).
    Returns ``(dense_s, {name: pruned_s}, base_s, {name: speedup})``.
    """
    from spdy.profilers import STANDIN, LayerChoice

    names = list(solutions)
    plans = [_plan(profile, bundle, database, None)]
    plans += [_plan(profile, bundle, database, solutions[n].levels) for n in names]
    plans.append({n: LayerChoice(STANDIN) for n in profile.table.layers})
    per_round = []
    for _ in range(max(1, rounds)):
        per_round.append([tm.median_s for tm in backend.time_models(bundle, plans)])
    arr = np.array(per_round)
    med = np.median(arr, axis=0)
    speedups = {n: float(np.median(arr[:, 0] / arr[:, 1 + i])) for i, n in enumerate(names)}
    return float(med[0]), {n: float(med[1 + i]) for i, n in enumerate(names)}, float(med[-1]), speedups


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
    rounds: int = 3,
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
    """
    table = profile.table
    sols = {"prior": dp.solve(table, dp.prior_errors(len(table.layers), len(table.grid)), target, buckets)}
    try:
        sols["uniform"] = uniform(table, target)
    except InfeasibleBudgetError:
        pass
    dense_s, times, base_s, _ = measure_speedups(profile, bundle, backend, database, sols, rounds=rounds)
    dense_ratio = dense_s / table.dense_total_s
    ratios = {n: (times[n] / sol.predicted_time_s) / dense_ratio for n, sol in sols.items()}
    q = correction_factor(list(ratios.values()))
    info = {"factor": q, "ratios": ratios, "rounds": rounds, "dense_measured_s": dense_s, "dense_predicted_s": table.dense_total_s,
            "base_measured_s": base_s, "base_profile_s": table.base_s,
            "pruned": {n: {"measured_s": times[n], "predicted_s": sols[n].predicted_time_s} for n in sols}}
    log.info("latency model check at %.3gx: pruned/dense measured-to-predicted ratios %s -> correction %.3f",
             target, {n: round(r, 3) for n, r in ratios.items()}, q)
    return q, info


def lowest_dp_target(target: float) -> float:
    """The lowest DP target aimed at for ``target`` when pruned models run faster than
    predicted (the latency check, the fit): never more than half of the asked-for gain."""
    return 1.0 + (target - 1.0) / 2


#: A pruned model measured within ``FIT_BAND`` x the target is kept as it is; outside it,
#: :func:`fit_to_measured` re-solves its budget, aiming at ``FIT_AIM`` x the target.
FIT_BAND = (0.99, 1.03)
FIT_AIM = 1.01


def fit_to_measured(
    target: float,
    outcomes: Mapping[str, Outcome],
    dp_targets: Mapping[str, float],
    resolve: Callable[[str, float], Outcome],
    measure: Callable[[dict[str, Solution]], Mapping[str, tuple[float, float, float]]],
    max_speedup: float,
    rounds: int = 2,
) -> tuple[dict[str, Outcome], dict[str, float], list[dict[str, Any]]]:
    """Close the loop on each pruned model's measured speedup.

    The latency check before the search corrects the DP's target from two probe models;
    the model the search picks can still measure a few percent off (machine noise, a
    different mix of kernels). Here each measured ``outcome`` outside ``FIT_BAND`` x
    ``target`` is solved again by its own method (``resolve``) for its DP target scaled
    by ``FIT_AIM * target / measured``, clipped to ``[1 + (target - 1) / 2, max_speedup]``.
    Each round measures every proposal *together with the model it would replace*,
    interleaved with the dense model, and decides on that measurement alone, so that one
    slow spell of a shared machine cannot move a model on its own:

    * the current model re-measures within the band: it stays (the first measurement was
      off), with the new measurement;
    * it re-measures too slow: the tighter proposal is taken if it measures faster;
    * it re-measures too fast: a looser proposal is taken only if it measures at least
      ``FIT_BAND[0]`` x ``target`` (else the next round tries halfway between the two); a
      tighter one (made from a reading that was too slow) never.

    ``resolve(name, dp_target)`` returns the unmeasured outcome (solution and calibration
    loss) for that budget (for SPDY, :meth:`spdy.sensitivity.Search.refine`);
    ``measure({key: solution})`` returns ``{key: (time_s, speedup, dense_time_s)}``.
    Returns the outcomes, their DP targets and one record per proposal.
    """
    outs, dpt = dict(outcomes), dict(dp_targets)
    low, high = FIT_BAND[0] * target, FIT_BAND[1] * target
    floor = lowest_dp_target(target)
    log_: list[dict[str, Any]] = []
    too_loose: dict[str, float] = {}  # per model: the loosest DP target that measured short
    for rnd in range(max(0, rounds)):
        proposals: dict[str, tuple[float, Outcome]] = {}
        for name, o in outs.items():
            s = o.measured_speedup
            if s is None or not math.isfinite(s) or low <= s <= high:
                continue
            new_t = min(max(dpt[name] * FIT_AIM * target / s, floor), max_speedup * (1 - 1e-3))  # DP buckets: not the edge itself
            if name in too_loose and new_t < dpt[name]:
                new_t = max(new_t, (dpt[name] + too_loose[name]) / 2)  # bisect towards the last one that measured short
            if abs(new_t - dpt[name]) <= 1e-6 * dpt[name]:
                continue  # already at the edge of what the profile allows
            try:
                cand = resolve(name, new_t)
            except InfeasibleBudgetError:
                continue
            if np.array_equal(cand.solution.levels, o.solution.levels):
                continue
            proposals[name] = (new_t, cand)
        if not proposals:
            break
        sols: dict[str, Solution] = {}
        for n, (_, c) in proposals.items():
            sols[f"{n}@current"] = outs[n].solution
            sols[n] = c.solution
        got = measure(sols)
        for name, (new_t, cand) in proposals.items():
            t_s, sp, dense_s = got[name]
            cand = dataclasses.replace(cand, measured_time_s=t_s, measured_speedup=sp, dense_time_s=dense_s)
            ct, cs, cd = got[f"{name}@current"]
            old = dataclasses.replace(outs[name], measured_time_s=ct, measured_speedup=cs, dense_time_s=cd)
            if low <= cs <= high:
                accepted, why = False, "the current model re-measured within the band"
            elif cs < low:
                accepted = new_t > dpt[name] and sp > cs
                why = "faster than the current model" if accepted else "not faster than the current model"
            else:  # too fast: only a looser budget that still meets the target replaces it
                accepted = new_t < dpt[name] and sp >= low
                why = ("still meets the target" if accepted else
                       "too slow" if new_t < dpt[name] else "the current model re-measured faster than the target")
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
    return outs, dpt, log_


def _stored_correction(storage: str | None, study_name: str) -> dict[str, Any] | None:
    if storage is None:
        return None
    import optuna

    from spdy.sensitivity import make_storage

    try:
        st = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    except Exception:  # noqa: BLE001 - no such study yet
        return None
    got = st.user_attrs.get("latency_correction")
    return dict(got) if isinstance(got, dict) else None


def _explain_shortfall(target: float, outcome: Outcome, dense_s: float, profile: Profile, drift: float) -> str:
    t = profile.table
    pred, meas = outcome.solution.predicted_time_s, outcome.measured_time_s or float("nan")
    parts = [
        f"measured speedup {outcome.measured_speedup:.2f}x is below {SPEEDUP_TOLERANCE:.0%} of the {target:g}x target.",
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


# --------------------------------------------------------------------------- search


def search(
    model: str | ModelBundle | nn.Module = "minilm",
    calibration: Sequence[Any] | None = None,
    speedup: float | str = 2.0,
    *,
    backend: str = "spdy-cpu",
    threads: int | None = None,
    profile: str | os.PathLike[str] | Profile | None = None,
    database: str | os.PathLike[str] | Any | None = None,
    method: str = "obs",
    grid: SparsityGrid | None = None,
    storage: str | None = None,
    study: str | None = None,
    max_evals: int | None = None,
    k: int | None = None,
    delta: float = 0.1,
    seed: int = 0,
    strategy: str = "spdy",
    buckets: int = dp.DEFAULT_BUCKETS,
    baselines: Sequence[str] = BASELINES,
    only_baseline: str | None = None,
    measure: bool = True,
    measure_rounds: int = 3,
    fit_rounds: int = 2,
    fit_evals: int = 16,
    calibrate: bool = True,
    evaluate_only: bool = False,
    eval_threads: int | None = None,
    force: bool = False,
    timing: Any = None,
    loss: str | Callable[..., Any] | None = None,
    forward: Callable[..., Any] | None = None,
    exclude: Sequence[str] = (),
    out: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> SearchOutcome:
    """Find per-layer sparsities that meet ``speedup`` on ``backend`` with the least calibration loss.

    * ``model``: ``"minilm"``, ``"package.module:factory"``, a :class:`ModelBundle`, or an
      ``nn.Module`` together with ``calibration`` (a list of input batches).
    * ``profile`` / ``database``: paths (or loaded objects); missing ones are measured/built
      and cached under :func:`cache_dir`.
    * ``storage`` / ``study``: Optuna storage (None: in memory; ``sqlite:///f.db``, an RDB URL
      or a journal file path) and study name. Processes sharing them share one search;
      a killed search resumes. ``evaluate_only`` makes this process a pure worker (no
      baselines, measurements or outputs).
    * ``max_evals`` / ``k`` / ``delta`` / ``seed`` / ``strategy``: the search budget
      (:class:`spdy.sensitivity.SearchConfig`); the default is Algorithm 4 in full.
    * ``only_baseline``: skip the search and report that baseline (``uniform``/``global``).
    * ``calibrate``: before searching, time two pruned models for the target end to end and
      tighten the DP's target by how much the latency model over-predicted their speedup
      (:func:`latency_correction`; stored with the study, so a resumed search reuses it).
    * ``fit_rounds``: after measuring, re-solve pruned models that measured outside
      ``FIT_BAND`` x the target for a budget corrected by their own measurement, and measure
      again, at most this many times (:func:`fit_to_measured`; 0 = off). SPDY's answer for a
      new budget costs ``fit_evals`` calibration-loss evaluations
      (:meth:`spdy.sensitivity.Search.refine`); a baseline's, one.
    * ``timing``: the profiler's :class:`~spdy.profilers.TimingPolicy` (default: the full one).
    * ``out``: write ``result.json``, ``model/`` (pruned weights) and ``profile.png`` there.
    """
    from spdy.profilers import get_backend
    from spdy.sensitivity import Schedule, Search, SearchConfig

    t_all = time.perf_counter()
    stage: dict[str, float] = {}
    target = dp.parse_speedup(speedup) if isinstance(speedup, str) else float(speedup)
    if not math.isfinite(target) or target <= 1:
        raise InvalidInputError(f"speedup must be greater than 1 (e.g. 2 or '2.5x'); got {speedup!r}")
    for b in (*baselines, *([only_baseline] if only_baseline else [])):
        if b not in BASELINES:
            raise InvalidInputError(f"unknown baseline {b!r}; expected one of {', '.join(BASELINES)}")
    cfg = SearchConfig(speedup=target, k=k, delta=delta, max_evals=max_evals, seed=seed, buckets=buckets,
                       strategy=strategy)

    t0 = time.perf_counter()
    bundle = as_bundle(model, calibration, loss=loss, forward=forward, exclude=exclude)
    specs = bundle.layers()
    stage["load_model"] = time.perf_counter() - t0

    be = get_backend(backend, threads=threads, policy=timing)
    t0 = time.perf_counter()
    if isinstance(profile, Profile):
        prof, prof_path = profile, None
        prof.check_model(specs)
        if not force:
            prof.check_hardware(be.fingerprint())
    else:
        prof, prof_path, _ = ensure_profile(bundle, be, path=profile, grid=grid or DEFAULT_GRID, specs=specs,
                                            force=force, progress=progress)
    stage["profile"] = time.perf_counter() - t0
    table = prof.table
    if grid is not None and tuple(grid.levels) != tuple(table.grid.levels):
        raise ProfileMismatchError(f"the profile has a {len(table.grid)}-level grid, not the {len(grid)} levels asked for")
    # fail fast on an unreachable target, before the database is built
    dp.solve(table, dp.prior_errors(len(table.layers), len(table.grid)), target, buckets)

    t0 = time.perf_counter()
    if database is None or isinstance(database, (str, os.PathLike)):
        db = ensure_database(bundle, path=database, grid=table.grid, method=method, specs=specs,
                             progress=progress is not None)
    else:
        db = database
        db.check_compatible(bundle, table.grid)
    if tuple(db.layers) != tuple(table.layers):
        raise ProfileMismatchError(
            f"the database's layers ({len(db.layers)}) differ from the profile's ({len(table.layers)}); "
            "were they made with the same --exclude?"
        )
    stage["database"] = time.perf_counter() - t0

    prev_threads = torch.get_num_threads()
    if eval_threads is not None:
        torch.set_num_threads(eval_threads)
    try:
        t0 = time.perf_counter()
        objective = CalibrationObjective(bundle, db, table.layers)
        stage["dense_outputs"] = time.perf_counter() - t0

        warnings: list[str] = []
        per_eval: dict[str, float] = {}
        n_evals = 0
        study_name = study or f"{_safe(bundle.name)}-{target:g}x-{strategy}-seed{seed}"
        t0 = time.perf_counter()
        correction = _stored_correction(storage, study_name) if only_baseline is None else None
        if correction is None and calibrate and measure:
            if progress:
                progress("calibrate", 0, 1, "latency model vs end-to-end")
            q, correction = latency_correction(prof, bundle, be, db, target, buckets)
            if progress:
                progress("calibrate", 1, 1, f"x{q:.3f}")
        q = float(correction["factor"]) if correction else 1.0
        dp_target = max(target * q, lowest_dp_target(target)) if q < 1 else target * q
        if q > 1 and dp_target > table.max_speedup():
            raise InfeasibleBudgetError(
                f"{target:g}x is out of reach end to end: pruned models ran {q:.2f}x slower than the latency model "
                f"predicts, so the DP would need {dp_target:.3f}x of a profile that reaches at most "
                f"{table.max_speedup():.3f}x. Ask for at most {table.max_speedup() / q:.2f}x.",
                max_speedup=table.max_speedup() / q,
            )
        stage["calibrate"] = time.perf_counter() - t0
        if eval_threads is not None:
            # timing the models set the backend's thread count (torch's too): evaluate with eval_threads
            torch.set_num_threads(eval_threads)
        cfg = dataclasses.replace(cfg, speedup=dp_target)
        t0 = time.perf_counter()
        if only_baseline is None:
            signature = {"model": bundle.name, "calibration": bundle.calibration_id, "database_method": db.method,
                         "profile": _digest(table.times.round(12).tolist() + [table.base_s]),
                         "k": Schedule.for_config(len(table.layers), cfg).k, "delta": delta, "buckets": buckets}
            srch = Search(table, objective, cfg, storage=storage, study_name=study_name, signature=signature)
            if correction and "latency_correction" not in srch.study.user_attrs:
                srch.study.set_user_attr("latency_correction", correction)
            cb = (lambda d, t, best: progress("search", d, t, f"best loss {best:.4g}")) if progress else None
            res = srch.run(progress=cb)
            n_evals = res.n_evaluations
            best = Outcome("spdy", res.solution, res.loss)
            if objective.calls:
                per_eval = {"dp": srch.stage_s["dp"] / max(1, objective.calls) * 1e3,
                            "stitch": objective.stitch_s / objective.calls * 1e3,
                            "loss": objective.loss_s / objective.calls * 1e3}
            stage["search"] = time.perf_counter() - t0
            if evaluate_only:
                return SearchOutcome(bundle.name, be.name, target, best, objective.dense_loss,
                                     n_evaluations=n_evals, study=study_name, storage=storage,
                                     stage_s=stage, per_evaluation_ms=per_eval)
        else:
            best = _baseline(only_baseline, table, bundle, dp_target, objective)
            stage["search"] = 0.0

        t0 = time.perf_counter()
        base_out: dict[str, Outcome | str] = {}
        for name in ([] if only_baseline else baselines):
            try:
                base_out[name] = _baseline(name, table, bundle, dp_target, objective)
            except InfeasibleBudgetError as exc:
                base_out[name] = str(exc)
                log.warning("baseline %s: %s", name, exc)
        stage["baselines"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev_threads)

    def with_formats(o: Outcome) -> Outcome:
        if prof.formats is None:
            return o
        fm = tuple(prof.formats[i][int(lv)] for i, lv in enumerate(o.solution.levels))
        return dataclasses.replace(o, formats=fm)

    best = with_formats(best)
    base_out = {k2: with_formats(v) if isinstance(v, Outcome) else v for k2, v in base_out.items()}

    dense_s: float | None = None
    drift: float | None = None
    fit_log: list[dict[str, Any]] = []
    if measure:
        t0 = time.perf_counter()
        if progress:
            progress("measure", 0, 1, "dense and pruned models end to end")
        sols = {"__best__": best.solution, **{n: o.solution for n, o in base_out.items() if isinstance(o, Outcome)}}
        dense_s, times, base_now, ratios = measure_speedups(prof, bundle, be, db, sols, rounds=measure_rounds)
        drift = base_now / table.base_s - 1 if table.base_s > 0 else float("nan")

        def measured(o: Outcome, key: str) -> Outcome:
            return dataclasses.replace(o, measured_time_s=times[key], measured_speedup=ratios[key], dense_time_s=dense_s)

        best = measured(best, "__best__")
        base_out = {n: measured(o, n) if isinstance(o, Outcome) else o for n, o in base_out.items()}
        stage["measure"] = time.perf_counter() - t0
        if fit_rounds > 0:
            t0 = time.perf_counter()
            best, base_out, fit_log = _fit(
                target, best, base_out, dp_target, fit_rounds, measure_rounds, prof, bundle, be, db, objective,
                (lambda t: srch.refine(t, evals=fit_evals)[1:]) if only_baseline is None else None,  # type: ignore[return-value]
                fit_evals, only_baseline, eval_threads, with_formats,
            )
            if fit_log:
                stage["fit"] = time.perf_counter() - t0
        dense_s = best.dense_time_s
        if progress:
            progress("measure", 1, 1, f"{best.measured_speedup:.2f}x")
        if best.measured_speedup is not None and best.measured_speedup < SPEEDUP_TOLERANCE * target:
            msg = _explain_shortfall(target, best, dense_s, prof, drift)
            warnings.append(msg)
            log.warning(msg)

    stage["total"] = time.perf_counter() - t_all
    outcome = SearchOutcome(
        model=bundle.name, backend=be.name, target_speedup=target, result=best, dense_loss=objective.dense_loss,
        baselines=base_out, dense_measured_s=dense_s, base_drift=drift, n_evaluations=n_evals, study=study_name,
        storage=storage, profile_path=str(prof_path) if prof_path else None,
        database_path=str(getattr(db, "path", "")) or None, stage_s={k2: round(v, 3) for k2, v in stage.items()},
        per_evaluation_ms={k2: round(v, 3) for k2, v in per_eval.items()}, fingerprint=be.fingerprint(),
        settings={"threads": be.threads, "eval_threads": eval_threads or prev_threads, "strategy": strategy,
                  "seed": seed, "max_evals": max_evals, "k": k, "delta": delta, "buckets": buckets,
                  "method": db.method, "grid_levels": len(table.grid), "calibration_samples": bundle.n_samples,
                  "batchnorm_tuning": bool(bundle.tune_batchnorm)},
        warnings=tuple(warnings),
        latency_correction=correction,
        dp_target_speedup=dp_target,
        fit=tuple(fit_log),
    )
    if out is not None:
        outcome = write_outputs(outcome, bundle, db, table, out)
    return outcome


def _fit(
    target: float, best: Outcome, base_out: dict[str, Outcome | str], dp_target: float, rounds: int, measure_rounds: int,
    prof: Profile, bundle: ModelBundle, be: Any, db: Any, objective: CalibrationObjective,
    refine: Callable[[float], tuple[Solution, float]] | None, refine_evals: int, only_baseline: str | None,
    eval_threads: int | None, with_formats: Callable[[Outcome], Outcome],
) -> tuple[Outcome, dict[str, Outcome | str], list[dict[str, Any]]]:
    """:func:`fit_to_measured` on the search's answer and the baselines (each by its own measurement).

    SPDY's answer for a new budget comes from ``refine`` (:meth:`spdy.sensitivity.Search.refine`:
    the search's best coefficients re-evaluated and locally searched at that budget)."""
    outs: dict[str, Outcome] = {"__best__": best, **{n: o for n, o in base_out.items() if isinstance(o, Outcome)}}

    def resolve(name: str, t: float) -> Outcome:
        prev = torch.get_num_threads()
        if eval_threads is not None:
            torch.set_num_threads(eval_threads)
        try:
            if name == "__best__" and refine is not None:
                sol, loss = refine(t)
                return with_formats(Outcome("spdy", sol, loss))
            base = only_baseline if name == "__best__" else name
            return with_formats(_baseline(str(base), prof.table, bundle, t, objective))
        finally:
            torch.set_num_threads(prev)

    def measure(sols: dict[str, Solution]) -> dict[str, tuple[float, float, float]]:
        dense_s, times, _, ratios = measure_speedups(prof, bundle, be, db, sols, rounds=measure_rounds)
        return {n: (times[n], ratios[n], dense_s) for n in sols}

    outs, _, fit_log = fit_to_measured(target, outs, {n: dp_target for n in outs}, resolve, measure,
                                       prof.table.max_speedup(), rounds)
    for rec in fit_log:
        rec["loss_evaluation_budget"] = refine_evals if rec["method"] == "spdy" and refine is not None else 1
    best = outs.pop("__best__")
    return best, {n: outs.get(n, o) for n, o in base_out.items()}, fit_log


def _baseline(name: str, table: Any, bundle: ModelBundle, target: float, objective: CalibrationObjective) -> Outcome:
    if name == "uniform":
        sol = uniform(table, target)
    else:
        weights = {n: get_module(bundle.model, n).weight.detach().float().numpy() for n in table.layers}
        sol = global_magnitude(table, weights, target)
    return Outcome(name, sol, objective(sol.levels))


def write_outputs(outcome: SearchOutcome, bundle: ModelBundle, database: Any, table: Any,
                  out: str | os.PathLike[str]) -> SearchOutcome:
    """``OUT/result.json``, ``OUT/model`` (pruned weights) and ``OUT/profile.png``."""
    from spdy.export import save_pruned
    from spdy.report import plot_profile

    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    outcome = dataclasses.replace(outcome, out=str(o))
    pruned = bundle.retune_batchnorm(database.stitch(bundle.model, outcome.result.solution, inplace=False))
    save_pruned(pruned, outcome.layers, o / "model", buffers=batchnorm_state(pruned) if bundle.tune_batchnorm else None,
                meta={
        "model": outcome.model, "backend": outcome.backend, "target_speedup": outcome.target_speedup,
        "predicted_speedup": outcome.predicted_speedup, "measured_speedup": outcome.measured_speedup,
        "method": outcome.result.method, "calibration_id": bundle.calibration_id,
    })
    del pruned
    bases = {n: b.solution for n, b in outcome.baselines.items() if isinstance(b, Outcome)}
    meas = f", measured {outcome.measured_speedup:.2f}x" if outcome.measured_speedup else ""
    plot_profile(table, outcome.result.solution, o / "profile.png", baselines=bases,
                 title=f"{outcome.model} on {outcome.backend}: target {outcome.target_speedup:g}x, "
                       f"predicted {outcome.predicted_speedup:.2f}x{meas}")
    atomic_write_json(o / "result.json", outcome.to_json())
    return outcome


# --------------------------------------------------------------------------- apply


def _result_dir(result: SearchOutcome | str | os.PathLike[str]) -> Path:
    if isinstance(result, SearchOutcome):
        if result.out is None:
            raise InvalidInputError("this search result was not written to disk; run spdy.search(..., out=DIR) first")
        return Path(result.out) / "model"
    p = Path(result)
    if (p / "model" / "manifest.json").exists():
        return p / "model"
    if (p / "manifest.json").exists():
        return p
    raise InvalidInputError(f"{str(p)!r} holds no pruned model (expected OUT/model/manifest.json from 'spdy search -o OUT')")


def apply(
    model: nn.Module | ModelBundle,
    result: SearchOutcome | str | os.PathLike[str],
    *,
    sparse: bool = False,
    threads: int | None = None,
) -> nn.Module:
    """Load a search result's pruned weights into ``model`` in place and return it.

    With ``sparse=True`` the pruned layers are also swapped for spdy's sparse CPU
    modules (:mod:`spdy.runtime`) in the kernel format the profile chose per layer,
    so that the model runs as fast as was measured; ``threads`` sets the thread count.
    """
    from spdy.export import apply_buffers, apply_weights, load_buffers, load_pruned

    if isinstance(model, ModelBundle):
        model = model.model
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    model_dir = _result_dir(result)
    weights, manifest = load_pruned(model_dir)
    for name in weights:
        try:
            get_module(model, name)
        except SpdyError as exc:
            raise ProfileMismatchError(f"{exc}; the pruned weights were made for another model "
                                       f"({manifest.get('model')!r})") from None
    apply_weights(model, weights)
    apply_buffers(model, load_buffers(model_dir))  # BatchNorm statistics re-estimated for the pruned model
    if sparse:
        from spdy import kernels, runtime

        kernels.warmup()  # starts Numba's pool (and turns off the nested OpenMP it enables)
        kernels.set_num_threads(threads if threads is not None else kernels.threads.available_cores())
        kernels.retain_freed_memory()  # as the spdy-cpu profile was measured
        for name, info in manifest["layers"].items():
            mod = get_module(model, name)
            fmt = info.get("format", "auto")
            if fmt == "dense":
                continue
            if isinstance(mod, nn.Linear):
                new: nn.Module = runtime.SparseLinear.from_linear(mod, format=fmt if fmt in runtime.FORMATS else "auto")
            elif isinstance(mod, nn.Conv2d):
                new = runtime.SparseConv2d.from_conv(mod, format=fmt if fmt in runtime.CONV_FORMATS else "auto")
            else:
                continue
            model.set_submodule(name, new.eval())
    return model


def load_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``OUT/result.json`` as a dict (``path`` is OUT or the file)."""
    p = Path(path)
    if p.is_dir():
        p = p / "result.json"
    d = read_json(p, "search result")
    if d.get("schema") != RESULT_SCHEMA:
        raise InvalidInputError(f"{p} is not an spdy search result (schema {d.get('schema')!r})")
    return d

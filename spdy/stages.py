"""The stages before the search: the model bundle, its latency profile, its database, the objective.

``ensure_profile`` and ``ensure_database`` load what was made before or make it:
a profile is cached per model, grid, N:M patterns, backend and hardware fingerprint, a
database per model, calibration set, grid, method and dense weights (its N:M patterns
are added to it when a search asks for more), both under :func:`cache_dir`
(``$SPDY_CACHE``, default ``~/.cache/spdy``). :func:`open_profile`, :func:`open_database`,
:func:`search_table` and :func:`run_search` are the steps :func:`spdy.search` takes;
:class:`Prepared` carries what they made to the later stages.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # before torch: torch and the spdy kernels then share one OpenMP pool
    import spdy.kernels  # noqa: F401
except ImportError:  # pragma: no cover - numba missing
    pass

import numpy as np
import torch
from torch import nn

from spdy import dp
from spdy.choices import Choice
from spdy.errors import InvalidInputError, ProfileMismatchError
from spdy.grid import DEFAULT_GRID, SparsityGrid
from spdy.hardware import VOLATILE_KEYS
from spdy.models.base import ModelBundle, get_module, load_model, resolve_loss
from spdy.profile import Profile, choice_table, load_profile, save_profile
from spdy.types import LatencyTable, LayerSpec

log = logging.getLogger(__name__)

#: ``progress(stage, done, total, info)``: ``stage`` is "profile", "database", "calibrate", "search" or "measure".
Progress = Callable[[str, int, int, str], None]


def cache_dir() -> Path:
    """Where profiles and databases are cached: ``$SPDY_CACHE`` or ``~/.cache/spdy``."""
    return Path(os.environ.get("SPDY_CACHE") or Path.home() / ".cache" / "spdy")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name).strip("_")[:60] or "model"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stable_fingerprint(fp: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fp.items() if k not in VOLATILE_KEYS}


def default_study_name(bundle: ModelBundle, config: Any) -> str:
    """The study of a search without ``study=``: model, target, strategy, seed and N:M patterns
    (``config`` a :class:`~spdy.sensitivity.SearchConfig`)."""
    return f"{_safe(bundle.name)}-{config.speedup:g}x-{config.effective_strategy}-seed{config.seed}" + "".join(
        f"-{p}" for p in config.patterns)


def profile_cache_path(bundle: ModelBundle, backend: Any, grid: SparsityGrid, specs: Sequence[LayerSpec],
                       patterns: Sequence[str] = ()) -> Path:
    """The cached profile's path: model name, layer signature, grid, N:M patterns, backend, hardware
    fingerprint, the BatchNorms folded in the timed model (:attr:`ModelBundle.inference`) and the
    latency model's version (a profile cached by an older spdy is measured again)."""
    from spdy.profilers.profiler import LATENCY_MODEL_VERSION

    folds = bundle.batchnorm_folds
    key = _digest({"specs": [s.to_json() for s in specs], "grid": grid.to_json(), "latency_model": LATENCY_MODEL_VERSION,
                   "fingerprint": _stable_fingerprint(backend.fingerprint()), "settings": backend.settings(),
                   **({"patterns": list(patterns)} if patterns else {}),
                   **({"batchnorm_folded": [p.to_json() for p in folds]} if folds else {})})
    return cache_dir() / "profiles" / f"{_safe(bundle.name)}-{backend.name}-t{backend.threads}-{key}.json"


def database_cache_path(bundle: ModelBundle, grid: SparsityGrid, method: str, specs: Sequence[LayerSpec]) -> Path:
    """The cached database's folder: model name, calibration set, grid, method and dense weights."""
    from spdy.database.store import weight_sha256

    weights = [weight_sha256(get_module(bundle.model, s.name).weight) for s in specs]
    key = _digest({"calibration": bundle.calibration_id, "grid": grid.to_json(), "method": method,
                   "specs": [s.to_json() for s in specs], "weights": weights})
    return cache_dir() / "databases" / f"{_safe(bundle.name)}-{method}-{key}"


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
    patterns: Sequence[str] = (),
) -> tuple[Profile, Path, bool]:
    """Load the profile at ``path`` (or the cached one), or measure and write it there.

    Returns ``(profile, path, measured)``. A profile made for another model or on other
    hardware raises :class:`ProfileMismatchError` unless ``force``. A profile measured
    here also times the N:M ``patterns`` (:func:`~spdy.profilers.profile_model`).
    """
    from spdy.profilers import profile_model, validate as validate_profile

    specs = list(specs) if specs is not None else bundle.layers()
    p = Path(path) if path is not None else profile_cache_path(bundle, backend, grid, specs, patterns)
    if p.exists():
        prof = load_profile(p, specs=specs, fingerprint=backend.fingerprint(), force=force)
        if prof.backend != backend.name:
            raise ProfileMismatchError(
                f"profile {str(p)!r} was measured with backend {prof.backend!r}, not {backend.name!r}; "
                f"pass --backend {prof.backend} or another --profile"
            )
        from spdy.profilers.profiler import LATENCY_MODEL_VERSION

        version = prof.settings.get("latency_model_version", 1)
        if version != LATENCY_MODEL_VERSION:
            log.warning("profile %s was measured by latency model version %s, this spdy's is %s: its table misses "
                        "what the newer one measures; re-run 'spdy profile' to use it", p, version,
                        LATENCY_MODEL_VERSION)
        log.info("using profile %s", p)
        return prof, p, False
    log.info("measuring a latency profile of %s on %s (%d layers x %d levels) into %s",
             bundle.name, backend.name, len(specs), len(grid), p)
    cb = (lambda d, t, w: progress("profile", d, t, w)) if progress else None
    prof = profile_model(bundle, backend, grid, specs=specs, progress=cb, patterns=patterns)
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
    patterns: Sequence[str] = (),
) -> Any:
    """Open the database at ``path`` (or the cached one), building or resuming it if needed;
    a database without some of the N:M ``patterns`` gets them added."""
    from spdy.database import Database, build_database

    specs = list(specs) if specs is not None else bundle.layers()
    p = Path(path) if path is not None else database_cache_path(bundle, grid, method, specs)
    if (p / "manifest.json").exists():
        db = Database.open(p, require_complete=False)
        if not db.missing and set(patterns) <= set(db.patterns):
            db.check_compatible(bundle, grid)
            if db.method != method and path is None:
                raise ProfileMismatchError(f"cached database {p} holds method {db.method!r}, not {method!r}")
            log.info("using database %s (%s)", p, db.method)
            return db
        db.close()
    log.info("building the %s reconstruction database of %s into %s", method, bundle.name, p)
    return build_database(bundle, p, grid, method=method, progress=progress, patterns=patterns)


class CalibrationObjective:
    """``levels -> calibration loss``: stitch a working copy from the database, run the calibration set.

    ``levels`` holds one column per layer; ``columns`` (a table's ``choices``) names the
    :class:`~spdy.choices.Choice` of each column (default: column = grid level).
    The dense model's outputs are computed once. A model with BatchNorm gets its running
    statistics re-estimated after each stitch (``bundle.tune_batchnorm``). Times spent stitching and evaluating
    are accumulated in ``stitch_s`` and ``loss_s`` (``calls`` evaluations).
    """

    def __init__(self, bundle: ModelBundle, database: Any, layers: Sequence[str],
                 columns: Sequence[Choice] | None = None) -> None:
        self.bundle = bundle
        self.db = database
        self.layers = tuple(layers)
        self.columns = None if columns is None else tuple(columns)
        t0 = time.perf_counter()
        self.dense_outputs = bundle.outputs()
        self.work = copy.deepcopy(bundle.model).eval()
        self.dense_loss = bundle.calibration_loss(bundle.model, self.dense_outputs)
        self.dense_s = time.perf_counter() - t0
        self.stitch_s = self.loss_s = 0.0
        self.calls = 0

    @property
    def n_batches(self) -> int:
        """Calibration batches; ``batches=`` of a call picks some of them by index."""
        return len(self.bundle.calibration)

    def __call__(self, levels: np.ndarray, batches: Sequence[int] | None = None) -> float:
        """The calibration loss of ``levels`` on the whole calibration set, or on the batches
        with the indices ``batches`` (BatchNorm statistics then re-estimated on those alone)."""
        t0 = time.perf_counter()
        self._stitch(levels)
        t1 = time.perf_counter()
        self.bundle.retune_batchnorm(self.work, batches)  # counted in loss_s: one more pass over the batches
        loss = self.bundle.calibration_loss(self.work, self.dense_outputs, batches)
        self.stitch_s += t1 - t0
        self.loss_s += time.perf_counter() - t1
        self.calls += 1
        return float(loss)

    def outputs(self, levels: np.ndarray) -> list[torch.Tensor]:
        """The outputs of the model pruned to ``levels`` on every calibration batch."""
        self._stitch(levels)
        self.bundle.retune_batchnorm(self.work)
        return self.bundle.outputs(self.work)

    def _stitch(self, levels: np.ndarray) -> None:
        cols = self.columns
        self.db.stitch(self.work, {n: int(lv) if cols is None else cols[int(lv)] for n, lv in zip(self.layers, levels)})


@dataclass(frozen=True)
class Prepared:
    """What the stages before the search made: the model, the backend it is timed on, its
    latency profile (``profile_path``: None when given as an object), its database and the
    table the search solves over (:func:`search_table`)."""

    bundle: ModelBundle
    backend: Any
    profile: Profile
    profile_path: Path | None
    database: Any
    table: LatencyTable


def open_profile(
    bundle: ModelBundle,
    backend: Any,
    profile: str | os.PathLike[str] | Profile | None,
    specs: Sequence[LayerSpec],
    *,
    grid: SparsityGrid | None,
    force: bool,
    progress: Progress | None,
    patterns: Sequence[str] = (),
) -> tuple[Profile, Path | None]:
    """The profile for :func:`spdy.search`: a given :class:`Profile` (checked against the model
    and, unless ``force``, the hardware) or :func:`ensure_profile`'s (timing the N:M ``patterns``
    too when it measures one); its grid must be ``grid``."""
    if isinstance(profile, Profile):
        prof, prof_path = profile, None
        prof.check_model(specs)
        if not force:
            prof.check_hardware(backend.fingerprint())
    else:
        prof, prof_path, _ = ensure_profile(bundle, backend, path=profile, grid=grid or DEFAULT_GRID, specs=specs,
                                            force=force, progress=progress, patterns=patterns)
    table = prof.table
    if grid is not None and tuple(grid.levels) != tuple(table.grid.levels):
        raise ProfileMismatchError(f"the profile has a {len(table.grid)}-level grid, not the {len(grid)} levels asked for")
    folded = [p.to_json() for p in bundle.batchnorm_folds]
    if prof.settings.get("batchnorm_folded", []) != folded:
        log.warning("the profile was measured with %d BatchNorm layers folded, the model is timed with %d folded "
                    "(ModelBundle.inference): its base time is off by those BatchNorms until it is measured again",
                    len(prof.settings.get("batchnorm_folded", [])), len(folded))
    return prof, prof_path


def open_database(
    bundle: ModelBundle,
    table: LatencyTable,
    database: str | os.PathLike[str] | Any | None,
    specs: Sequence[LayerSpec],
    *,
    method: str,
    progress: Progress | None,
    patterns: Sequence[str] = (),
) -> Any:
    """The database for :func:`spdy.search`: an open one (checked against the model) or
    :func:`ensure_database`'s (with the N:M ``patterns``); its layers must be the profile's."""
    if database is None or isinstance(database, (str, os.PathLike)):
        db = ensure_database(bundle, path=database, grid=table.grid, method=method, specs=specs,
                             progress=progress is not None, patterns=patterns)
    else:
        db = database
        db.check_compatible(bundle, table.grid)
    if tuple(db.layers) != tuple(table.layers):
        raise ProfileMismatchError(
            f"the database's layers ({len(db.layers)}) differ from the profile's ({len(table.layers)}); "
            "were they made with the same --exclude?"
        )
    return db


def check_reachable(profile: Profile, patterns: Sequence[str], target: float, buckets: int) -> None:
    """Raise :class:`~spdy.errors.InfeasibleBudgetError` unless the DP reaches ``target`` over the
    profile's grid levels and ``patterns`` (before the database is built)."""
    table = choice_table(profile, patterns)
    dp.solve(table, dp.prior_errors(len(table.layers), len(table.grid), None, table.positions()), target, buckets)


def search_table(profile: Profile, patterns: Sequence[str], database: Any = None) -> LatencyTable:
    """The table the search solves over: the profile's grid levels, then a column per N:M
    pattern (:func:`~spdy.profile.choice_table`) for the layers where the backend timed a
    kernel for it and the ``database`` holds its weight. A pattern no layer has is logged as
    not a choice on this backend and left out: the search is then the grid's alone."""
    table = choice_table(profile, patterns, database=database)
    offered = table.pattern_layers()
    for p, n in offered.items():
        if n:
            log.info("N:M %s is a choice for %d of %d layers", p, n, len(table.layers))
            continue
        timed = int(np.isfinite(profile.pattern_times[:, profile.patterns.index(p)]).sum())  # type: ignore[index]
        why = (f"backend {profile.backend} has no {p} kernel for any layer" if not timed else
               f"the database holds no {p} weight for the {timed} layers with a {p} kernel")
        log.warning("N:M %s is not a choice in this search: %s", p, why)
    keep = [p for p, n in offered.items() if n]
    return table if len(keep) == len(offered) else choice_table(profile, keep, database=database)


def run_search(
    prepared: Prepared,
    objective: CalibrationObjective,
    config: Any,
    *,
    storage: str | None,
    study_name: str,
    correction: Mapping[str, Any] | None,
    progress: Progress | None,
) -> tuple[Any, Any, dict[str, float]]:
    """Run (or resume, or join) the sensitivity search for ``config`` (a
    :class:`spdy.sensitivity.SearchConfig` whose ``speedup`` is the DP's target).

    The study is signed with what its losses depend on (model, calibration set, database
    method, profile, schedule), so a study in a shared storage is never continued by a
    different search; the latency ``correction`` is stored with it for a resumed search.
    Returns ``(search, result, per-evaluation milliseconds of DP, stitch and loss)``.
    """
    from spdy.evo import make_search
    from spdy.sensitivity import Schedule

    table = prepared.table
    signature = {"model": prepared.bundle.name, "calibration": prepared.bundle.calibration_id,
                 "database_method": prepared.database.method,
                 "profile": _digest(table.times.round(12).tolist() + [table.base_s]),
                 "k": Schedule.for_config(len(table.layers), config).k, "delta": config.delta,
                 "buckets": config.buckets}
    # the layers' weights rank them for the evolutionary search's global-magnitude seed
    model = prepared.bundle.model
    magnitudes = {n: get_module(model, n).weight.detach().float().numpy() for n in table.layers} if table.is_grid else None
    srch = make_search(table, objective, config, storage=storage, study_name=study_name, signature=signature,
                       magnitudes=magnitudes)
    if correction and "latency_correction" not in srch.study.user_attrs:
        srch.study.set_user_attr("latency_correction", dict(correction))
    cb = (lambda d, t, best: progress("search", d, t, f"best loss {best:.4g}")) if progress else None
    res = srch.run(progress=cb)
    per_eval: dict[str, float] = {}
    if objective.calls:
        per_eval = {"dp": srch.stage_s["dp"] / max(1, objective.calls) * 1e3,
                    "stitch": objective.stitch_s / objective.calls * 1e3,
                    "loss": objective.loss_s / objective.calls * 1e3}
    return srch, res, per_eval

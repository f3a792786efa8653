"""The stages of :func:`spdy.search` between the profile and database and the written result.

:func:`find` runs the stages that evaluate calibration losses (the dense outputs, the
latency check, the search or a baseline alone, the baselines) and :func:`search_outcome`
assembles the :class:`~spdy.results.SearchOutcome`; :func:`spdy.measure.measure_and_fit`
runs in between. Kept apart from :mod:`spdy.api`, which only chains the stages.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

try:  # before torch: torch and the spdy kernels then share one OpenMP pool
    import spdy.kernels  # noqa: F401
except ImportError:  # pragma: no cover - numba missing
    pass

import torch

from spdy.errors import InfeasibleBudgetError
from spdy.measure import Measured, MeasureConfig, baseline, check_latency
from spdy.profilers.dense_runtimes import DenseRuntimes
from spdy.quality import assess
from spdy.reference import Reference
from spdy.results import Outcome, SearchOutcome
from spdy.stages import CalibrationObjective, Prepared, Progress, run_search

if TYPE_CHECKING:
    from spdy.sensitivity import SearchConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Found:
    """What :func:`find` found: SPDY's answer (or the baseline asked for alone) and the baselines, unmeasured."""

    objective: CalibrationObjective
    correction: dict[str, Any] | None
    dp_target: float
    best: Outcome
    baselines: dict[str, Outcome | str]
    searcher: Any | None
    n_evaluations: int
    per_evaluation_ms: dict[str, float]
    reference: Reference  # what the target is over, as the latency check measured it


def find(run: Prepared, cfg: SearchConfig, mcfg: MeasureConfig, *, storage: str | None, study_name: str,
         baselines: Sequence[str], only_baseline: str | None, evaluate_only: bool, eval_threads: int | None,
         progress: Progress | None, stage: dict[str, float], reference: Reference,
         runtimes: DenseRuntimes | None) -> Found:
    """The stages that evaluate losses, on ``eval_threads`` torch threads: the dense outputs, the
    latency check, the search (or ``only_baseline``) and the baselines; their times go to ``stage``.
    ``reference`` is the dense runtime asked for (with an estimate of its ratio to the dense plan),
    ``runtimes`` the dense runtimes the latency check times (see :func:`spdy.measure.check_latency`)."""
    prev_threads = torch.get_num_threads()
    if eval_threads is not None:
        torch.set_num_threads(eval_threads)
    try:
        t0 = time.perf_counter()
        objective = CalibrationObjective(run.bundle, run.database, run.table.layers, run.table.choices)
        stage["dense_outputs"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        correction, dp_target = check_latency(run, cfg.speedup, cfg.buckets, mcfg, storage=storage,
                                              study_name=study_name, resume=only_baseline is None, progress=progress,
                                              reference=reference, runtimes=runtimes)
        if correction and "reference" in correction:
            reference = Reference.from_json(correction["reference"])
        stage["calibrate"] = time.perf_counter() - t0
        if eval_threads is not None:
            # timing the models set the backend's thread count (torch's too): evaluate with eval_threads
            torch.set_num_threads(eval_threads)
        t0 = time.perf_counter()
        srch, n_evals, per_eval = None, 0, {}
        if only_baseline is None:
            srch, res, per_eval = run_search(run, objective, dataclasses.replace(cfg, speedup=dp_target),
                                             storage=storage, study_name=study_name, correction=correction,
                                             progress=progress)
            n_evals, best = res.n_evaluations, Outcome("spdy", res.solution, res.loss)
        else:
            best = baseline(only_baseline, run.table, run.bundle, dp_target, objective)
        stage["search"] = time.perf_counter() - t0 if only_baseline is None else 0.0
        base_out: dict[str, Outcome | str] = {}
        if not (evaluate_only and only_baseline is None):
            t0 = time.perf_counter()
            for name in ([] if only_baseline else baselines):
                try:
                    base_out[name] = baseline(name, run.table, run.bundle, dp_target, objective)
                except InfeasibleBudgetError as exc:
                    base_out[name] = str(exc)
                    log.warning("baseline %s: %s", name, exc)
            stage["baselines"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev_threads)
    return Found(objective, correction, dp_target, best, base_out, srch, n_evals, per_eval, reference)


def search_outcome(run: Prepared, cfg: SearchConfig, found: Found, measured: Measured | None, best: Outcome,
                   base_out: dict[str, Outcome | str], *, study_name: str, storage: str | None, eval_threads: int,
                   stage: dict[str, float]) -> SearchOutcome:
    """The :class:`SearchOutcome` of a search that went through every stage."""
    reference = found.reference
    if measured is not None:
        best, base_out = measured.best, measured.baselines
        # the measurement may have held the target to a faster runtime than the latency check found
        reference = measured.reference or reference
    quality = assess(found.objective, run.table, best.solution.levels, best.calibration_loss, cfg.speedup,
                     to_dp=reference.dp_speedup)
    warnings = (*(measured.warnings if measured else ()), *([quality.message(cfg.speedup)] if quality.far or quality.degraded else []))
    return SearchOutcome(
        model=run.bundle.name, backend=run.backend.name, target_speedup=cfg.speedup, result=best,
        dense_loss=found.objective.dense_loss, baselines=base_out,
        dense_measured_s=measured.dense_s if measured else None, base_drift=measured.drift if measured else None,
        n_evaluations=found.n_evaluations, study=study_name, storage=storage,
        profile_path=str(run.profile_path) if run.profile_path else None,
        database_path=str(getattr(run.database, "path", "")) or None,
        stage_s={k: round(v, 3) for k, v in stage.items()},
        per_evaluation_ms={k: round(v, 3) for k, v in found.per_evaluation_ms.items()},
        fingerprint=run.backend.fingerprint(),
        settings={"threads": run.backend.threads, "eval_threads": eval_threads, "strategy": cfg.effective_strategy,
                  "strategy_asked": cfg.strategy, "seed": cfg.seed, "max_evals": cfg.max_evals, "k": cfg.k,
                  "delta": cfg.delta, "buckets": cfg.buckets,
                  "method": run.database.method, "grid_levels": len(run.table.grid),
                  "calibration_samples": run.bundle.n_samples, "batchnorm_tuning": bool(run.bundle.tune_batchnorm),
                  "speedup_percentile": measured.percentile if measured else None,
                  "reference": found.reference.asked,
                  "patterns": {p: run.table.pattern_layers().get(p, 0) for p in cfg.patterns}},
        warnings=warnings, latency_correction=found.correction, quality=quality.to_json(),
        dp_target_speedup=found.dp_target, fit=measured.fit if measured else (),
        reference=reference.to_json(), dense_runtime_s=measured.dense_runtime_s if measured else {},
    )

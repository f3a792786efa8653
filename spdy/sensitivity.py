"""SPDY's sensitivity search (paper Algorithm 4) with Optuna for bookkeeping and storage.

Every evaluation is an Optuna trial: coefficients ``c`` -> error scores
``e[l][i] = c_l * (i / (|S| - 1))^2`` -> DP -> stitch from the database ->
calibration loss. The schedule is a pure function of the trial number, so
several processes (or machines sharing an RDB) can work on one study:

* trial ``n < k + 1`` (random phase): ``c ~ U[0, 1]^L`` drawn from ``seed`` and ``n``
  alone, so the random phase draws exactly what one worker would;
* later trials (local phase, ``d = ceil(delta * L) .. 1``, ``k`` tries each): the best
  ``c`` among the completed trials in the shared storage, with ``d`` coordinates
  re-drawn from ``seed`` and ``n``;
* trials past the budget are not evaluated (told PRUNED, attribute ``skipped``).

The table's columns may hold N:M patterns besides the grid's levels (per-layer
choices such as dense, unstructured levels and 2:4, :func:`spdy.profile.choice_table`):
the prior then places each column at its position on the grid
(:meth:`~spdy.types.LatencyTable.positions`), and the objective receives one column
index per layer (map it with ``table.choices_of(levels)``).

Several workers share a study through its storage (:class:`spdy.storage.SharedStudy`).
A trial's place in the schedule is its *slot*: its trial number, unless retries took
numbers in between (:func:`spdy.storage.slots`). Every worker works until each slot
below the schedule's total holds a COMPLETE trial. A trial whose worker is gone (its
process has left this host, or its heartbeat is older than ``stale_after_s``) is
failed and retried by the first worker that sees it; the retry evaluates the same slot,
and the late result of a worker that was only slow is dropped, so every slot completes
once. A worker interrupted in a trial (Ctrl-C, an error) retries it on its way out,
so a killed search resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

from spdy import dp
from spdy.choices import parse_patterns
from spdy.errors import InvalidInputError
from spdy.storage import SharedStudy, make_storage
from spdy.types import LatencyTable, Solution

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "spdy", "evo", "spdy+evo", "tpe", "cmaes", "random")
#: ``auto`` runs the evolutionary search from ``AUTO_EVO_FROM`` up to below ``AUTO_EVO_BELOW``
#: evaluations, Algorithm 4 then evo from there, Algorithm 4 alone below (:func:`resolve_strategy`)
AUTO_EVO_FROM, AUTO_EVO_BELOW = 10, 100
Objective = Callable[[np.ndarray], float]
#: seconds a worker with no slot left to start waits between looks at the other workers' trials
POLL_S = 0.5


@dataclass(frozen=True)
class SearchConfig:
    """How to search. ``k`` and ``delta`` are Algorithm 4's; ``max_evals`` caps the trials.

    With ``max_evals`` below the full schedule and no explicit ``k``, ``k`` shrinks so
    that the random phase and every local-search width still run (a miniature of
    Algorithm 4); trials past the schedule continue the local search with ``d = 1``.
    ``heartbeat_s`` is how often a worker beats for the trial it evaluates; a trial with
    no beat for ``stale_after_s`` is retried by another worker (one whose worker process
    has left this host at once).
    ``patterns`` (``"2:4"``, ``("2:4", "4:8")``) are N:M choices :func:`spdy.search` offers
    each layer besides the grid's levels, where the backend times them and the database
    holds their weights.
    ``strategy`` (:data:`STRATEGIES`): ``spdy`` (Algorithm 4), ``evo`` (:mod:`spdy.evo`),
    ``spdy+evo`` (Algorithm 4 for half the evaluations, then evo from its best levels),
    ``tpe``/``cmaes``/``random`` (Optuna's samplers over the coefficients); the default
    ``auto`` stands for one of them by budget (:attr:`effective_strategy`).
    """

    speedup: float
    k: int | None = None
    delta: float = 0.1
    max_evals: int | None = None
    seed: int = 0
    buckets: int = dp.DEFAULT_BUCKETS
    strategy: str = "auto"
    heartbeat_s: float = 30.0
    stale_after_s: float = 120.0
    patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        dp.parse_speedup(self.speedup)
        object.__setattr__(self, "patterns", parse_patterns(self.patterns))
        if self.strategy not in STRATEGIES:
            raise InvalidInputError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if self.k is not None and self.k < 1:
            raise InvalidInputError(f"k must be >= 1; got {self.k}")
        if not 0 < self.delta <= 1:
            raise InvalidInputError(f"delta must lie in (0, 1]; got {self.delta}")
        if self.max_evals is not None and self.max_evals < 1:
            raise InvalidInputError(f"max_evals must be >= 1; got {self.max_evals}")
        if not 0 < self.heartbeat_s < self.stale_after_s:
            raise InvalidInputError(f"heartbeat_s must lie in (0, stale_after_s); got {self.heartbeat_s} and "
                                    f"stale_after_s {self.stale_after_s}")

    @property
    def effective_strategy(self) -> str:
        """The strategy that runs: ``strategy``, with ``auto`` resolved (:func:`resolve_strategy`)."""
        return resolve_strategy(self.strategy, self.max_evals, self.patterns)


def resolve_strategy(strategy: str, max_evals: int | None, patterns: Sequence[str] = ()) -> str:
    """The strategy ``auto`` stands for; any other strategy is returned as it is.

    Measured at equal numbers of full loss evaluations (BENCHMARKS.md, MiniLM at 2x and the
    digits CNN at 1.5x and 2x, three seeds): at 40 evaluations the evolutionary search had the
    lower mean loss in 4 of 5 cases (MiniLM 1.5x and 2x, digits 1.5x and 2x; not MiniLM
    2.5x, where Algorithm 4 was 1.8% lower); at 120-150 Algorithm 4 for half the budget, then evo from
    its best levels (``spdy+evo``), had a mean loss no higher than Algorithm 4's in every case,
    while evo alone stalled on MiniLM, and at 500 (digits) ``spdy+evo`` had the lowest loss in
    every seed. So ``auto`` is ``evo`` below :data:`AUTO_EVO_BELOW` evaluations and
    ``spdy+evo`` from there (and for the full default budget). Below :data:`AUTO_EVO_FROM`
    evaluations it is Algorithm 4: a generation costs about three evaluations, too few
    generations fit, and evo would leave part of the budget unspent. With N:M ``patterns``
    it is Algorithm 4 too: evo searches grid levels only.
    """
    if strategy != "auto":
        return strategy
    if patterns or (max_evals is not None and max_evals < AUTO_EVO_FROM):
        return "spdy"
    return "evo" if max_evals is not None and max_evals < AUTO_EVO_BELOW else "spdy+evo"


@dataclass(frozen=True)
class Schedule:
    """Algorithm 4's trial schedule for ``n_layers`` layers."""

    n_layers: int
    k: int
    d_max: int
    total: int

    @classmethod
    def for_config(cls, n_layers: int, cfg: SearchConfig) -> "Schedule":
        d_max = max(1, math.ceil(cfg.delta * n_layers))
        if cfg.k is not None:
            k = cfg.k
        elif cfg.max_evals is not None:
            k = max(1, min(100, (cfg.max_evals - 1) // (1 + d_max)))
        else:
            k = 100
        full = (k + 1) + d_max * k
        return cls(n_layers, k, d_max, cfg.max_evals if cfg.max_evals is not None else full)

    def phase(self, n: int) -> tuple[str, int]:
        """("random", 0) or ("local", d) for trial number ``n``."""
        if n <= self.k:
            return "random", 0
        step = (n - self.k - 1) // self.k
        return "local", max(1, self.d_max - step)


def _rng(seed: int, n: int) -> np.random.Generator:
    return np.random.default_rng([seed, n])


def candidate(schedule: Schedule, seed: int, n: int, best_c: np.ndarray | None) -> tuple[np.ndarray, str, int]:
    """The coefficient vector Algorithm 4 evaluates as trial ``n``."""
    phase, d = schedule.phase(n)
    rng = _rng(seed, n)
    if phase == "random" or best_c is None:
        return rng.random(schedule.n_layers), "random", 0
    return redraw(best_c, d, rng), phase, d


def redraw(c: np.ndarray, d: int, rng: np.random.Generator) -> np.ndarray:
    """Algorithm 4's local step: a copy of ``c`` with ``d`` coordinates drawn anew from U[0, 1]."""
    out = c.copy()
    idx = rng.choice(len(out), size=min(d, len(out)), replace=False)
    out[idx] = rng.random(len(idx))
    return out


@contextlib.contextmanager
def optuna_warnings_only() -> Iterator[None]:
    """Within: Optuna logs warnings and errors only (not a line per trial), unless it was set quieter.

    Optuna's level is process-wide, so it is raised only while spdy drives a study and
    restored afterwards.
    """
    prev = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(prev, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(prev)


def _slot(t: optuna.trial.FrozenTrial) -> int:
    """The slot a completed trial evaluated (recorded with it; its number in a study of older spdy)."""
    return int(t.user_attrs.get("slot", t.number))


def _sampler(strategy: str, seed: int) -> optuna.samplers.BaseSampler:
    if strategy == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if strategy == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def distinct_starts(vectors: Iterable[np.ndarray], top: int) -> list[np.ndarray]:
    """The first ``top`` distinct vectors (at least one) of ``vectors``, in order, to refine from."""
    starts: list[np.ndarray] = []
    for v in vectors:
        if not any(np.array_equal(v, s) for s in starts):
            starts.append(v)
        if len(starts) >= max(1, top):
            break
    if not starts:
        raise InvalidInputError("the search has no completed evaluation to refine from")
    return starts


@dataclass
class SearchResult:
    """The best trial of a search and its bookkeeping."""

    solution: Solution
    coefficients: np.ndarray
    loss: float
    n_evaluations: int
    study_name: str
    history: list[dict[str, Any]] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)


class Search:
    """One worker of an SPDY search over a latency table and an objective ``levels -> loss``."""

    def __init__(
        self,
        table: LatencyTable,
        objective: Objective,
        config: SearchConfig,
        storage: str | None = None,
        study_name: str = "spdy",
        signature: dict[str, Any] | None = None,
        positions: np.ndarray | None = None,
    ) -> None:
        if type(self) is Search and config.effective_strategy in ("evo", "spdy+evo"):
            raise InvalidInputError(f"strategy {config.effective_strategy!r} is not Search's; make the search with "
                                    "spdy.evo.make_search, which picks the class of the strategy")
        self.table = table
        self.objective = objective
        self.cfg = config
        self.positions = table.positions() if positions is None else positions  # of the columns, for the prior
        self.schedule = Schedule.for_config(len(table.layers), config)
        self.L, self.S = table.times.shape
        self.budget = table.budget_for(config.speedup)
        dp.warmup()
        # fail fast on an unreachable target, before any storage is touched
        self._solve_prior(None)
        self.storage = (make_storage(storage, heartbeat_s=config.heartbeat_s, grace_s=config.stale_after_s)
                        or optuna.storages.InMemoryStorage())
        with optuna_warnings_only():
            self.study = optuna.create_study(
                storage=self.storage,
                study_name=study_name,
                direction="minimize",
                sampler=_sampler(config.effective_strategy, config.seed),
                load_if_exists=True,
            )
        self._check_signature(signature or {})
        self.shared = SharedStudy(self.study, self.storage, config.heartbeat_s, config.stale_after_s)
        self._loss_cache: dict[bytes, float] = {}
        self.stage_s = {"dp": 0.0, "objective": 0.0}

    # -- storage bookkeeping -------------------------------------------------
    def _check_signature(self, signature: dict[str, Any]) -> None:
        sig = {"speedup": self.cfg.speedup, "seed": self.cfg.seed, "strategy": self.cfg.effective_strategy,
               "layers": list(self.table.layers), "levels": len(self.table.grid), **signature}
        if not self.table.is_grid:
            sig["choices"] = [c.label for c in self.table.choices]
        stored = self.study.user_attrs.get("signature")
        if stored is None:
            self.study.set_user_attr("signature", sig)
        elif stored != sig:
            diff = sorted(k for k in set(stored) | set(sig) if stored.get(k) != sig.get(k))
            raise InvalidInputError(
                f"study {self.study.study_name!r} in this storage belongs to another search (differs in {diff}); "
                "use another --study name or storage"
            )

    def _trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def best(self) -> tuple[np.ndarray | None, float]:
        done = [t for t in self._trials() if t.state == optuna.trial.TrialState.COMPLETE and "c" in t.user_attrs]
        if not done:
            return None, math.inf
        b = min(done, key=lambda t: (t.value, _slot(t)))
        return np.array(b.user_attrs["c"]), float(b.value)  # type: ignore[arg-type]

    # -- one evaluation ------------------------------------------------------
    def _solve_prior(self, c: np.ndarray | None, speedup: float | None = None) -> Solution:
        target = self.cfg.speedup if speedup is None else speedup
        errors = dp.prior_errors(self.L, len(self.table.grid), c, self.positions)
        return dp.solve(self.table, errors, target, self.cfg.buckets)

    def solve(self, c: np.ndarray, speedup: float | None = None) -> Solution:
        """The DP's answer for coefficients ``c``, for the search's target or for ``speedup``."""
        t0 = time.perf_counter()
        sol = self._solve_prior(c, speedup)
        self.stage_s["dp"] += time.perf_counter() - t0
        return sol

    def loss(self, levels: np.ndarray) -> tuple[float, bool]:
        """The calibration loss of ``levels`` and whether this worker had scored them before."""
        key = np.asarray(levels).tobytes()
        cached = key in self._loss_cache
        if not cached:
            t0 = time.perf_counter()
            self._loss_cache[key] = float(self.objective(levels))
            self.stage_s["objective"] += time.perf_counter() - t0
        return self._loss_cache[key], cached

    def _evaluate(self, number: int, trial: optuna.trial.Trial) -> float | None:
        """The calibration loss of slot ``number``, evaluated as ``trial`` and recorded with its
        candidate; None if another worker failed the trial meanwhile (it took this one for gone)."""
        if self.cfg.effective_strategy == "spdy":
            best_c, _ = self.best()
            c, phase, d = candidate(self.schedule, self.cfg.seed, number, best_c)
        else:
            c = np.array([trial.suggest_float(f"c{i}", 0.0, 1.0) for i in range(self.L)])
            phase, d = self.cfg.effective_strategy, 0
        sol = self.solve(c)
        loss, cached = self.loss(sol.levels)
        if not math.isfinite(loss):
            raise InvalidInputError(f"the calibration loss of trial {number} is {loss}; check the model and loss")
        # "c" last: a trial counts as done once it has it (best, n_complete, history)
        attrs = {"phase": phase, "d": d, "levels": [int(x) for x in sol.levels],
                 "predicted_speedup": sol.predicted_speedup, "cached": cached, "c": [float(x) for x in c]}
        try:
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
        except optuna.exceptions.UpdateFinishedTrialError:
            return None
        return loss

    def run(self, progress: Callable[[int, int, float], None] | None = None) -> SearchResult:
        """Work on the study until every slot of the schedule holds a completed trial (waiting
        for the trials other workers run, retrying those whose workers are gone); returns the best."""
        with optuna_warnings_only():
            return self._run(progress)

    def _run(self, progress: Callable[[int, int, float], None] | None) -> SearchResult:
        t_start = time.perf_counter()
        while True:
            total = self.schedule.total
            self.shared.reclaim(total)
            got = self.shared.take(total)
            if got is None:
                if self.shared.finished(total):
                    break
                time.sleep(POLL_S)
                continue
            trial, slot = got
            loss = self.shared.evaluate(trial, slot, lambda: self._evaluate(slot, trial))
            if loss is None or not self.shared.tell(trial, loss):
                log.info("trial %d (slot %d) was failed by another worker meanwhile; its retry evaluates the slot",
                         trial.number, slot)
            if progress is not None:
                progress(self.n_complete(), total, self.best()[1])
        self.stage_s["wall"] = time.perf_counter() - t_start
        return self.result()

    def refine(self, speedup: float, evals: int = 16, top: int = 4) -> tuple[np.ndarray, Solution, float]:
        """The best coefficients for another target ``speedup``, from this search's trials.

        When the budget moves after the search (the fit to a measured speedup), the best
        coefficients found for the old budget need not be best for the new one. This
        evaluates the ``top`` best distinct coefficient vectors of the completed trials at
        ``speedup``, then Algorithm 4's local step from the best of them (``d`` from
        ``ceil(delta * L)`` down to 1, seeded) until ``evals`` evaluations in all; returns
        ``(c, solution, loss)`` of the best. Kept out of the study: it is not resumable.
        """
        done = sorted((t for t in self._trials() if t.state == optuna.trial.TrialState.COMPLETE and "c" in t.user_attrs),
                      key=lambda t: (t.value, _slot(t)))
        starts = distinct_starts((np.array(t.user_attrs["c"]) for t in done), top)
        losses: dict[bytes, float] = {}

        def score(c: np.ndarray) -> tuple[Solution, float]:
            sol = self._solve_prior(c, speedup)
            key = sol.levels.tobytes()
            if key not in losses:  # this process may have scored these levels in the search already
                losses[key] = self.loss(sol.levels)[0]
            return sol, losses[key]

        best: tuple[np.ndarray, Solution, float] | None = None
        for c in starts[:evals]:
            sol, loss = score(c)
            if best is None or loss < best[2]:
                best = (c, sol, loss)
        assert best is not None
        n_local = max(0, evals - len(starts))
        for n in range(n_local):
            d = max(1, self.schedule.d_max - (n * self.schedule.d_max) // max(1, n_local))
            rng = np.random.default_rng([self.cfg.seed, 0x5EF1, int(round(speedup * 1e6)), n])
            c = redraw(best[0], d, rng)
            sol, loss = score(c)
            if loss < best[2]:
                best = (c, sol, loss)
        log.info("refine at %.4gx: %d evaluations (%d distinct), best loss %.5g", speedup, min(evals, len(starts)) + n_local,
                 len(losses), best[2])
        return best

    def n_complete(self) -> int:
        return sum(1 for t in self._trials() if t.state == optuna.trial.TrialState.COMPLETE and "c" in t.user_attrs)

    def history(self) -> list[dict[str, Any]]:
        """The completed evaluations in slot order: ``number`` is the slot, ``trial`` Optuna's trial number."""
        out = []
        for t in sorted(self._trials(), key=_slot):
            if t.state == optuna.trial.TrialState.COMPLETE and "c" in t.user_attrs:
                out.append({"number": _slot(t), "trial": t.number, "loss": t.value, "phase": t.user_attrs["phase"],
                            "d": t.user_attrs["d"], "worker": t.user_attrs.get("worker"),
                            "predicted_speedup": t.user_attrs["predicted_speedup"]})
        return out

    def result(self) -> SearchResult:
        best_c, best_loss = self.best()
        if best_c is None:
            raise InvalidInputError("the search has no completed evaluation yet")
        return SearchResult(
            solution=self.solve(best_c),
            coefficients=best_c,
            loss=best_loss,
            n_evaluations=self.n_complete(),
            study_name=self.study.study_name,
            history=self.history(),
            timings_s=dict(self.stage_s),
        )

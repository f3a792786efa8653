"""An evolutionary search over per-layer levels under the time budget (``--strategy evo``).

Algorithm 4 searches sensitivity coefficients and lets the DP turn them into levels.
This strategy searches the levels themselves, with a (1 + lambda) evolutionary search
in the manner of EvoPress, under the profile's predicted-time budget instead of a
parameter budget:

* **Seeds**: trial 0 evaluates the DP's answer under SPDY's prior with every coefficient
  1 (or the levels given as ``EvoConfig.init_levels``, e.g. Algorithm 4's best, fitted to
  the budget); trial 1 uniform sparsity, the lowest single level that meets the budget with
  the time left over given to layers one level lighter (:func:`uniform_seed`); with the
  layers' weights given (``magnitudes``), trial 2 global magnitude pruning, one threshold
  across the layers (:func:`global_seed`), fitted the same way. The best of them is the
  first parent, so the search starts no worse than either one-shot rule at its budget.
* **Mutation** (:func:`mutate`): a child of the parent moves levels between layers:
  ``1 .. max_moves`` times, one layer is pruned ``1 .. max_step`` levels harder and
  another as many levels lighter. A child over the budget is fitted back with the DP
  (:func:`fit_budget`: the feasible levels closest to the child, the moved layers held
  four times as firmly), and time left over goes to the other layers, one level at a
  time, as long as it fits.
* **Selection** with growing data: each generation scores ``offspring`` children on a
  random ``fidelity[0]`` share of the calibration batches, the best ``survivors`` of
  them on a fresh ``fidelity[1]`` share, and the best survivor on all batches. That
  full loss is the trial's value; the parent of a generation is the best full loss in
  the study so far (elitism), so the search never loses its best.

A generation is one Optuna trial, evaluated under its own number from ``seed`` and the
best completed trial, so a killed search resumes and several workers share one study
as with the other strategies. The search's ``max_evals`` counts full loss evaluations:
a partial one counts by its share of the calibration batches
(:meth:`EvoConfig.generation_cost`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from spdy import dp
from spdy.errors import InfeasibleBudgetError, InvalidInputError
from spdy.sensitivity import Objective, Search, SearchConfig, SearchResult, _slot, distinct_starts
from spdy.types import LatencyTable, Solution

log = logging.getLogger(__name__)

#: how much more firmly :func:`fit_budget` holds the layers a mutation moved
MOVED_WEIGHT = 4.0
#: seed trials before the generations: the prior's (or given) levels, then uniform sparsity, then
#: global magnitude pruning where the search has the layers' weights
SEEDS = 3


@dataclass(frozen=True)
class EvoConfig:
    """The evolutionary search's shape (defaults: 8 children on 1/8 of the data, 2 on 1/2, 1 on all)."""

    offspring: int = 8
    survivors: int = 2
    fidelity: tuple[float, float] = (0.125, 0.5)
    max_step: int = 3
    max_moves: int = 3
    init_levels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.offspring < 1 or not 1 <= self.survivors <= self.offspring:
            raise InvalidInputError(f"need offspring >= survivors >= 1; got {self.offspring}, {self.survivors}")
        if len(self.fidelity) != 2 or not all(0 < f <= 1 for f in self.fidelity):
            raise InvalidInputError(f"fidelity holds two shares of the calibration set in (0, 1]; got {self.fidelity}")
        if self.max_step < 1 or self.max_moves < 1:
            raise InvalidInputError(f"max_step and max_moves must be >= 1; got {self.max_step}, {self.max_moves}")

    def stages(self, n_batches: int | None) -> list[tuple[int, int | None]]:
        """``(candidates kept into the stage, batches scored on)`` per selection stage; None = all.

        Without a batch count (an objective that scores the whole set only) every stage is
        full, so the survivors stage is skipped and the best child goes to the final one.
        """
        out: list[tuple[int, int | None]] = []
        for size, share in ((self.offspring, self.fidelity[0]), (self.survivors, self.fidelity[1])):
            nb = None if n_batches is None else max(1, round(share * n_batches))
            if nb is None or nb >= n_batches:  # type: ignore[operator]
                out.append((size, None))
                return out
            out.append((size, nb))
        out.append((1, None))
        return out

    def generation_cost(self, n_batches: int | None) -> float:
        """Full loss evaluations one generation costs (a partial one by its share of the batches)."""
        return sum(size * (1.0 if nb is None else nb / n_batches) for size, nb in self.stages(n_batches))  # type: ignore[operator]


def layer_times(table: LatencyTable, levels: np.ndarray) -> float:
    """The predicted time of the prunable layers at ``levels`` (base excluded, fused pairs' savings taken off)."""
    return table.predicted_time(levels) - table.base_s


def fit_budget(levels: np.ndarray, table: LatencyTable, budget: float, rng: np.random.Generator,
               held: Sequence[int] = (), buckets: int = dp.DEFAULT_BUCKETS) -> np.ndarray:
    """``levels`` made to fit ``budget`` seconds of layer time, changing as little as it can.

    Over the budget: the DP picks the feasible levels with the least summed squared distance
    to ``levels`` (layers in ``held`` weigh :data:`MOVED_WEIGHT` times more). Then, in a
    random order, any layer not in ``held`` whose next lighter level still fits moves to it,
    until none does, so the child uses the budget the way its parent did.
    """
    lv = np.asarray(levels, dtype=np.int64).copy()
    L, S = table.times.shape
    if layer_times(table, lv) > budget:
        w = np.ones(L)
        w[list(held)] = MOVED_WEIGHT
        dist = w[:, None] * (np.arange(S)[None, :] - lv[:, None]).astype(np.float64) ** 2
        lv, _ = dp.solve_table(table, dist, budget, buckets)
    free = np.array([i for i in range(L) if i not in set(held)], dtype=np.int64)
    moved = True
    while moved:
        moved = False
        for li in rng.permutation(free):
            if lv[li] > 0:
                lv[li] -= 1
                new = layer_times(table, lv)
                if new <= budget:
                    moved = True
                else:
                    lv[li] += 1
    return lv


def mutate(parent: np.ndarray, table: LatencyTable, budget: float, rng: np.random.Generator, cfg: EvoConfig,
           buckets: int = dp.DEFAULT_BUCKETS) -> tuple[np.ndarray, int]:
    """A child of ``parent`` that fits ``budget`` (see the module docstring); (levels, moves made)."""
    L, S = table.times.shape
    child = np.asarray(parent, dtype=np.int64).copy()
    moves = int(rng.integers(1, cfg.max_moves + 1))
    held: list[int] = []
    for _ in range(moves):
        harder, lighter = (int(i) for i in rng.choice(L, 2, replace=False))
        step = int(rng.integers(1, cfg.max_step + 1))
        child[harder] = min(S - 1, child[harder] + step)
        child[lighter] = max(0, child[lighter] - step)
        held += [harder, lighter]
    return fit_budget(child, table, budget, rng, held, buckets), moves


def uniform_seed(table: LatencyTable, budget: float, rng: np.random.Generator,
                 buckets: int = dp.DEFAULT_BUCKETS) -> np.ndarray | None:
    """Uniform sparsity for ``budget`` seconds of layer time: every layer at the lowest level whose
    uniform model meets it (:func:`spdy.baselines.uniform`), then :func:`fit_budget`'s use of the
    time left over; None when no single level meets it."""
    from spdy.baselines import uniform

    try:
        levels = uniform(table, table.dense_total_s / (table.base_s + budget)).levels
    except InfeasibleBudgetError:
        return None
    return fit_budget(np.asarray(levels, dtype=np.int64), table, budget, rng, buckets=buckets)


def global_seed(table: LatencyTable, magnitudes: Mapping[str, np.ndarray], budget: float, rng: np.random.Generator,
                buckets: int = dp.DEFAULT_BUCKETS) -> np.ndarray | None:
    """Global magnitude pruning for ``budget`` seconds of layer time: one threshold across the
    layers' ``magnitudes`` (:func:`spdy.baselines.global_magnitude`), then :func:`fit_budget`'s use
    of the time left over; None when no threshold meets it."""
    from spdy.baselines import global_magnitude

    try:
        levels = global_magnitude(table, magnitudes, table.dense_total_s / (table.base_s + budget)).levels
    except InfeasibleBudgetError:
        return None
    return fit_budget(np.asarray(levels, dtype=np.int64), table, budget, rng, buckets=buckets)


class EvoSearch(Search):
    """One worker of an evolutionary search (see the module docstring); the same study,
    storage, resume and result as :class:`~spdy.sensitivity.Search`."""

    def __init__(self, table: LatencyTable, objective: Objective, config: SearchConfig, *args: Any,
                 evo: EvoConfig | None = None, magnitudes: Mapping[str, np.ndarray] | None = None,
                 **kwargs: Any) -> None:
        """``magnitudes``: each layer's weight (any array of its shape whose absolute values rank
        its weights), for the global-magnitude seed; without them that seed is not tried."""
        if not table.is_grid:
            raise InvalidInputError("--strategy evo searches grid levels; it does not take N:M pattern choices yet")
        self.magnitudes = dict(magnitudes) if magnitudes is not None else None
        self.n_seeds = SEEDS if self.magnitudes is not None else SEEDS - 1
        if self.magnitudes is not None and kwargs.get("signature") is not None:  # seeded otherwise: another search
            kwargs["signature"] = {**kwargs["signature"], "evo_seeds": self.n_seeds}
        super().__init__(table, objective, config, *args, **kwargs)
        self.evo = evo or EvoConfig()
        if self.evo.init_levels is not None and len(self.evo.init_levels) != self.L:
            raise InvalidInputError(f"init_levels has {len(self.evo.init_levels)} levels; the table has {self.L} layers")
        nb = getattr(objective, "n_batches", None)
        self.n_batches: int | None = int(nb) if nb is not None else None
        self.gen_cost = self.evo.generation_cost(self.n_batches)
        evals = config.max_evals if config.max_evals is not None else self.schedule.total
        seeds = min(self.n_seeds, max(1, int(evals)))
        trials = seeds + max(0, int(math.floor((evals - seeds) / self.gen_cost + 1e-9)))
        self.schedule = dataclasses.replace(self.schedule, total=trials)

    # -- the study's trials ----------------------------------------------------
    def _done(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self._trials() if t.state == optuna.trial.TrialState.COMPLETE and "levels" in t.user_attrs]

    def best(self) -> tuple[np.ndarray | None, float]:
        done = self._done()
        if not done:
            return None, math.inf
        b = min(done, key=lambda t: (t.value, _slot(t)))
        return np.array(b.user_attrs["levels"], dtype=np.int64), float(b.value)  # type: ignore[arg-type]

    def n_complete(self) -> int:
        return len(self._done())

    def history(self) -> list[dict[str, Any]]:
        return [{"number": _slot(t), "trial": t.number, "loss": t.value, "phase": t.user_attrs["phase"],
                 "d": t.user_attrs["d"], "evaluations": t.user_attrs["evaluations"], "worker": t.user_attrs.get("worker"),
                 "predicted_speedup": t.user_attrs["predicted_speedup"]}
                for t in sorted(self._done(), key=_slot)]

    def evaluations(self) -> float:
        """Full loss evaluations the completed trials cost."""
        return float(sum(t.user_attrs.get("evaluations", 1.0) for t in self._done()))

    def result(self) -> SearchResult:
        levels, loss = self.best()
        if levels is None:
            raise InvalidInputError("the search has no completed evaluation yet")
        return SearchResult(solution=self.table.solution(levels), coefficients=np.array([]), loss=loss,
                            n_evaluations=int(round(self.evaluations())), study_name=self.study.study_name,
                            history=self.history(), timings_s=dict(self.stage_s))

    # -- one generation ----------------------------------------------------------
    def _seed_levels(self, budget: float, which: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, 0xE70, which])
        lv = None
        if which == 1:
            lv = uniform_seed(self.table, budget, rng, self.cfg.buckets)
        elif which == 2 and self.magnitudes is not None:
            lv = global_seed(self.table, self.magnitudes, budget, rng, self.cfg.buckets)
        if lv is not None:
            return lv
        if self.evo.init_levels is not None:
            rng = np.random.default_rng([self.cfg.seed, 0xE70, 0])
            return fit_budget(np.array(self.evo.init_levels, dtype=np.int64), self.table, budget, rng,
                              buckets=self.cfg.buckets)
        return self._solve_prior(None).levels.astype(np.int64)

    def _score(self, levels: np.ndarray, batches: np.ndarray | None) -> float:
        if batches is None:
            return self.loss(levels)[0]
        return float(self.objective(levels, batches=batches))  # type: ignore[call-arg]

    def generation(self, parent: np.ndarray, rng: np.random.Generator, budget: float) -> tuple[np.ndarray, float, int]:
        """One generation from ``parent``: (the winning child, its full loss, moves of that child)."""
        kids: list[tuple[np.ndarray, int]] = []
        seen = {parent.tobytes()}
        for _ in range(4 * self.evo.offspring):
            child, moves = mutate(parent, self.table, budget, rng, self.evo, self.cfg.buckets)
            if child.tobytes() not in seen:
                seen.add(child.tobytes())
                kids.append((child, moves))
            if len(kids) == self.evo.offspring:
                break
        if not kids:
            raise InvalidInputError("no child of the parent fits the budget apart from the parent itself; "
                                    "the grid or the budget leaves nothing to search")
        pool = kids
        loss = math.nan
        for size, nb in self.evo.stages(self.n_batches):
            pool = pool[:size]
            batches = None if nb is None else np.sort(rng.choice(self.n_batches, nb, replace=False))  # type: ignore[arg-type]
            scored = sorted(((self._score(c, batches), i) for i, (c, _m) in enumerate(pool)))
            pool = [pool[i] for _s, i in scored]
            loss = scored[0][0]
        assert len(pool) >= 1 and math.isfinite(loss)
        return pool[0][0], loss, pool[0][1]

    def _evaluate(self, number: int, trial: optuna.trial.BaseTrial | None) -> float | None:
        budget = self.budget
        parent, _ = self.best()
        if number < self.n_seeds:
            levels, moves, cost = self._seed_levels(budget, number), 0, 1.0
            phase = ("seed", "seed-uniform", "seed-global")[number]
            loss = self.loss(levels)[0]
        else:
            if parent is None:  # another worker is still scoring the seed: it is the only parent there can be
                parent = self._seed_levels(budget)
            rng = np.random.default_rng([self.cfg.seed, 0xE70, number])
            levels, loss, moves = self.generation(parent, rng, budget)
            phase, cost = "evo", self.gen_cost
        if not math.isfinite(loss):
            raise InvalidInputError(f"the calibration loss of trial {number} is {loss}; check the model and loss")
        pred = self.table.predicted_time(levels)
        # "levels" last: a trial counts as done once it has them (_done), so a worker that reads the
        # trial between two of these writes never sees it done without the rest
        attrs = {"phase": phase, "d": moves, "evaluations": cost, "predicted_speedup": self.table.dense_total_s / pred,
                 "cached": False, "levels": [int(x) for x in levels]}
        try:
            for k, v in attrs.items():
                trial.set_user_attr(k, v)  # type: ignore[union-attr]
        except optuna.exceptions.UpdateFinishedTrialError:
            return None
        return loss

    def refine(self, speedup: float, evals: int = 16, top: int = 4) -> tuple[np.ndarray, Solution, float]:
        """The best levels for another target ``speedup``: the ``top`` best distinct levels of
        the study fitted to its budget and scored, then generations from the best of them
        until ``evals`` full evaluations in all. Kept out of the study: not resumable."""
        budget = self.table.budget_for(dp.parse_speedup(speedup))
        rng = np.random.default_rng([self.cfg.seed, 0x5EF1, int(round(speedup * 1e6))])
        done = sorted(self._done(), key=lambda t: (t.value, _slot(t)))
        starts = distinct_starts((fit_budget(np.array(t.user_attrs["levels"], dtype=np.int64), self.table, budget, rng,
                                             buckets=self.cfg.buckets) for t in done), top)
        best = min(((lv, self.loss(lv)[0]) for lv in starts[:evals]), key=lambda p: p[1])
        spent = float(min(evals, len(starts)))
        while spent + self.gen_cost <= evals:
            child, loss, _ = self.generation(best[0], rng, budget)
            spent += self.gen_cost
            if loss < best[1]:
                best = (child, loss)
        log.info("refine at %.4gx: %.1f evaluations, best loss %.5g", speedup, spent, best[1])
        return best[0], self.table.solution(best[0]), best[1]


class HybridSearch:
    """``--strategy spdy+evo``: Algorithm 4 for the first half of the evaluations, then the
    evolutionary search seeded with Algorithm 4's best levels for the rest.

    The two phases are two studies in one storage: ``study_name`` (Algorithm 4) and
    ``study_name + "-evo"``, signed with the first one's name. Every worker finishes the
    first phase (waiting for the others' trials, as :meth:`Search.run` does) before it
    seeds the second from the same best levels, so a killed search resumes in either
    phase and several workers share both. Evo's seed trial re-scores those levels from
    the first phase's cache and counts as one evaluation.
    """

    def __init__(self, table: LatencyTable, objective: Objective, config: SearchConfig, storage: str | None = None,
                 study_name: str = "spdy", signature: dict[str, Any] | None = None,
                 positions: np.ndarray | None = None, magnitudes: Mapping[str, np.ndarray] | None = None) -> None:
        from spdy.sensitivity import Schedule

        total = config.max_evals if config.max_evals is not None else \
            Schedule.for_config(len(table.layers), dataclasses.replace(config, strategy="spdy")).total
        if total < 2:
            raise InvalidInputError(f"--strategy spdy+evo needs at least 2 evaluations (half each way); got {total}")
        self.table, self.objective, self.cfg = table, objective, config
        self.first_evals, self.rest_evals = total // 2, total - total // 2
        self._evo_args = (storage, f"{study_name}-evo", {**(signature or {}), "after": study_name}, positions)
        self.magnitudes = magnitudes
        self.first = Search(table, objective, dataclasses.replace(config, strategy="spdy", max_evals=self.first_evals),
                            storage, study_name, signature, positions)
        self.second: EvoSearch | None = None

    @property
    def study(self) -> optuna.Study:
        return self.first.study

    @property
    def stage_s(self) -> dict[str, float]:
        parts = [self.first.stage_s] + ([self.second.stage_s] if self.second is not None else [])
        return {k: sum(p.get(k, 0.0) for p in parts) for k in {k for p in parts for k in p}}

    def _evo(self, init: np.ndarray) -> EvoSearch:
        storage, name, signature, positions = self._evo_args
        cfg = dataclasses.replace(self.cfg, strategy="evo", max_evals=self.rest_evals)
        evo = EvoSearch(self.table, self.objective, cfg, storage=storage, study_name=name, positions=positions,
                        signature={**signature, "init_levels": [int(x) for x in init]},
                        evo=EvoConfig(init_levels=tuple(int(x) for x in init)), magnitudes=self.magnitudes)
        evo._loss_cache = self.first._loss_cache  # the seed trial re-scores Algorithm 4's best from the cache
        return evo

    def run(self, progress: Any = None) -> SearchResult:
        first_total = self.first.schedule.total
        res1 = self.first.run(progress=progress)
        self.second = self._evo(res1.solution.levels)
        total = first_total + self.second.schedule.total
        cb = (lambda d, _t, best: progress(first_total + d, total, min(best, res1.loss))) if progress else None
        res2 = self.second.run(progress=cb)
        return self._combine(res1, res2)

    def _combine(self, res1: SearchResult, res2: SearchResult) -> SearchResult:
        history = res1.history + [{**h, "number": h["number"] + self.first.schedule.total} for h in res2.history]
        best = res2 if res2.loss <= res1.loss else res1
        return SearchResult(solution=best.solution, coefficients=res1.coefficients, loss=best.loss,
                            n_evaluations=res1.n_evaluations + res2.n_evaluations, study_name=res1.study_name,
                            history=history, timings_s=dict(self.stage_s))

    def refine(self, speedup: float, evals: int = 16, top: int = 4) -> tuple[np.ndarray, Solution, float]:
        """The best levels for another target ``speedup`` (:meth:`EvoSearch.refine` of the second
        phase, whose trials start from the first phase's best)."""
        if self.second is None:
            raise InvalidInputError("the search has not reached its evolutionary phase; run it first")
        return self.second.refine(speedup, evals, top)


def make_search(table: LatencyTable, objective: Objective, config: SearchConfig, **kwargs: Any) -> Any:
    """The search that runs ``config.effective_strategy``: :class:`EvoSearch`, :class:`HybridSearch` or
    :class:`~spdy.sensitivity.Search` (Algorithm 4 and Optuna's samplers); ``kwargs`` go to it
    (``magnitudes``, the global-magnitude seed's weights, only to the evolutionary ones)."""
    cls = {"evo": EvoSearch, "spdy+evo": HybridSearch}.get(config.effective_strategy, Search)
    if cls is Search:
        kwargs.pop("magnitudes", None)
    return cls(table, objective, config, **kwargs)

"""The evolutionary search: budget fitting against brute force, mutation, fidelity schedule, resume."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from spdy import dp
from spdy.errors import InvalidInputError
from spdy.evo import EvoConfig, EvoSearch, HybridSearch, fit_budget, layer_times, make_search, mutate
from spdy.grid import SparsityGrid
from spdy.sensitivity import AUTO_EVO_BELOW, AUTO_EVO_FROM, Search, SearchConfig, resolve_strategy
from spdy.types import LatencyTable


def _table(L: int = 4, S: int = 5, seed: int = 0) -> LatencyTable:
    rng = np.random.default_rng(seed)
    dense = rng.uniform(1.0, 3.0, L)
    frac = np.sort(rng.uniform(0.1, 1.0, (L, S - 1)), axis=1)[:, ::-1]
    times = np.concatenate([dense[:, None], dense[:, None] * frac], axis=1)
    grid = SparsityGrid(tuple(np.linspace(0.0, 0.9, S)))
    return LatencyTable(tuple(f"l{i}" for i in range(L)), grid, times, 1.0, {})


class SeparableObjective:
    """A loss that is a sum of known per-layer errors, plus per-batch noise: the DP with the true
    errors gives its optimum, so a search can be checked against it."""

    def __init__(self, errors: np.ndarray, n_batches: int = 16, noise: float = 0.02, seed: int = 0) -> None:
        self.errors, self.n_batches = errors, n_batches
        self.noise = np.random.default_rng(seed).normal(0.0, noise, n_batches)
        self.calls: list[int] = []

    def __call__(self, levels: np.ndarray, batches: np.ndarray | None = None) -> float:
        idx = np.arange(self.n_batches) if batches is None else np.asarray(batches)
        self.calls.append(len(idx))
        true = float(self.errors[np.arange(len(levels)), levels].sum())
        return true * (1.0 + float(self.noise[idx].mean()))


def _closest_feasible_brute(levels: np.ndarray, table: LatencyTable, budget: float, w: np.ndarray) -> float:
    L, S = table.times.shape
    best = math.inf
    for lv in itertools.product(range(S), repeat=L):
        a = np.array(lv)
        if layer_times(table, a) <= budget:
            best = min(best, float((w * (a - levels) ** 2).sum()))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_fit_budget_moves_as_little_as_brute_force_then_fills_the_slack(seed: int) -> None:
    table = _table(seed=seed)
    rng = np.random.default_rng(seed)
    L, S = table.times.shape
    levels = rng.integers(0, 2, L)  # light levels: over most budgets
    budget = layer_times(table, np.full(L, S - 1)) + rng.uniform(0.2, 0.6) * (
        layer_times(table, np.zeros(L, dtype=np.int64)) - layer_times(table, np.full(L, S - 1)))
    held = [0]
    out = fit_budget(levels, table, budget, rng, held=held, buckets=100_000)
    assert layer_times(table, out) <= budget
    w = np.ones(L)
    w[held] = 4.0
    # the projection (before the fill, which only lowers free layers) is the closest feasible profile
    projected = dp.solve_budget(table.times, w[:, None] * (np.arange(S)[None, :] - levels[:, None]) ** 2.0,
                                budget, 100_000)[0]
    assert float((w * (projected - levels) ** 2).sum()) == pytest.approx(
        _closest_feasible_brute(levels, table, budget, w))
    # after the fill, no free layer can go one level lighter and still fit
    for li in range(1, L):
        if out[li] > 0:
            lighter = out.copy()
            lighter[li] -= 1
            assert layer_times(table, lighter) > budget


def test_fit_budget_leaves_a_fitting_profile_alone_except_the_fill() -> None:
    table = _table()
    L, S = table.times.shape
    levels = np.full(L, S - 1)
    budget = layer_times(table, levels) + 1e-9
    out = fit_budget(levels, table, budget, np.random.default_rng(0))
    np.testing.assert_array_equal(out, levels)


def test_mutate_gives_a_different_child_within_budget() -> None:
    table = _table(L=8, S=10)
    rng = np.random.default_rng(1)
    L, S = table.times.shape
    budget = table.budget_for(1.6)
    parent = dp.solve(table, dp.prior_errors(L, S), 1.6).levels
    cfg = EvoConfig()
    kids = [mutate(parent, table, budget, rng, cfg)[0] for _ in range(20)]
    assert all(layer_times(table, k) <= budget for k in kids)
    assert all(k.min() >= 0 and k.max() < S for k in kids)
    assert sum(not np.array_equal(k, parent) for k in kids) >= 15


def test_fidelity_stages_and_their_cost() -> None:
    cfg = EvoConfig()
    assert cfg.stages(16) == [(8, 2), (2, 8), (1, None)]
    assert cfg.generation_cost(16) == pytest.approx(8 * 2 / 16 + 2 * 8 / 16 + 1)
    assert cfg.stages(1) == [(8, None)] and cfg.generation_cost(1) == 8
    assert cfg.stages(None) == [(8, None)]
    with pytest.raises(InvalidInputError):
        EvoConfig(offspring=2, survivors=3)
    with pytest.raises(InvalidInputError):
        EvoConfig(fidelity=(0.0, 0.5))


def _errors(table: LatencyTable, seed: int = 0) -> np.ndarray:
    L, S = table.times.shape
    sens = np.random.default_rng(seed).uniform(0.05, 3.0, L)
    return sens[:, None] * (np.arange(S)[None, :] / (S - 1)) ** 2


def test_evo_improves_on_its_seed_and_approaches_the_true_optimum(tmp_path) -> None:
    table = _table(L=10, S=12, seed=3)
    errors = _errors(table)
    obj = SeparableObjective(errors)
    cfg = SearchConfig(speedup=1.7, max_evals=60, seed=0, strategy="evo")
    res = EvoSearch(table, obj, cfg).run()
    seed_levels = dp.solve(table, dp.prior_errors(*table.times.shape), 1.7).levels
    optimum = dp.solve(table, errors, 1.7).total_error
    seed_loss = float(errors[np.arange(10), seed_levels].sum())
    found = float(errors[np.arange(10), res.solution.levels].sum())
    assert res.solution.predicted_speedup >= 1.7 * (1 - 1e-9)
    assert found < seed_loss
    assert found - optimum < 0.5 * (seed_loss - optimum)
    # max_evals counts full evaluations: a partial one by its share of the batches
    assert res.n_evaluations <= 60 and sum(obj.calls) / obj.n_batches <= 60 + 1e-9
    assert any(n < obj.n_batches for n in obj.calls)


def test_evo_resumes_and_shares_a_study(tmp_path) -> None:
    table = _table(L=6, S=8, seed=1)
    errors = _errors(table, 1)
    store = str(tmp_path / "s.journal")
    one = EvoSearch(table, SeparableObjective(errors), SearchConfig(speedup=1.5, max_evals=31, seed=2, strategy="evo"))
    full = one.run()
    # the same study in a storage, in two halves and two "workers": same trials, same best
    half = SearchConfig(speedup=1.5, max_evals=16, seed=2, strategy="evo")
    EvoSearch(table, SeparableObjective(errors), half, storage=store).run()
    rest = SearchConfig(speedup=1.5, max_evals=31, seed=2, strategy="evo")
    second = EvoSearch(table, SeparableObjective(errors), rest, storage=store)
    res = second.run()
    assert res.loss == pytest.approx(full.loss)
    np.testing.assert_array_equal(res.solution.levels, full.solution.levels)
    again = EvoSearch(table, SeparableObjective(errors), rest, storage=store)
    calls_before = len(again.objective.calls)
    again.run()
    assert len(again.objective.calls) == calls_before  # nothing left to evaluate


def test_evo_warm_start_and_refine() -> None:
    table = _table(L=8, S=10, seed=4)
    errors = _errors(table, 4)
    L, S = table.times.shape
    init = tuple(int(x) for x in np.full(L, S - 1))
    srch = EvoSearch(table, SeparableObjective(errors), SearchConfig(speedup=1.4, max_evals=10, strategy="evo"),
                     evo=EvoConfig(init_levels=init))
    res = srch.run()
    assert [h["phase"] for h in res.history[:3]] == ["seed", "seed-uniform", "evo"]
    levels, sol, loss = srch.refine(1.8, evals=8)
    assert sol.predicted_speedup >= 1.8 * (1 - 1e-9) and np.array_equal(sol.levels, levels)
    assert table.solution(levels).predicted_time_s == pytest.approx(table.predicted_time(levels))
    with pytest.raises(InvalidInputError):
        EvoSearch(table, SeparableObjective(errors), SearchConfig(speedup=1.4, strategy="evo"),
                  evo=EvoConfig(init_levels=(0, 1)))


# -- the default strategy and Algorithm 4 then evo ------------------------------------------


def test_auto_is_evo_for_short_searches_and_spdy_then_evo_for_long_ones() -> None:
    assert resolve_strategy("auto", 40) == "evo" and resolve_strategy("auto", AUTO_EVO_BELOW - 1) == "evo"
    assert resolve_strategy("auto", AUTO_EVO_FROM) == "evo" and resolve_strategy("auto", AUTO_EVO_FROM - 1) == "spdy"
    assert resolve_strategy("auto", AUTO_EVO_BELOW) == "spdy+evo" and resolve_strategy("auto", None) == "spdy+evo"
    assert resolve_strategy("auto", 40, ("2:4",)) == "spdy"  # evo searches grid levels only
    assert resolve_strategy("tpe", 40) == "tpe"
    cfg = SearchConfig(speedup=2.0, max_evals=40)
    assert cfg.strategy == "auto" and cfg.effective_strategy == "evo"
    assert dataclasses.replace(cfg, max_evals=200).effective_strategy == "spdy+evo"  # resolved by the budget it has
    table, errors = _table(L=6, S=8, seed=1), _errors(_table(L=6, S=8, seed=1), 1)
    kinds = {st: type(make_search(table, SeparableObjective(errors), SearchConfig(speedup=1.5, max_evals=20, strategy=st)))
             for st in ("auto", "evo", "spdy", "spdy+evo", "random")}
    assert kinds == {"auto": EvoSearch, "evo": EvoSearch, "spdy": Search, "spdy+evo": HybridSearch, "random": Search}
    with pytest.raises(InvalidInputError, match="make_search"):
        Search(table, SeparableObjective(errors), SearchConfig(speedup=1.5, max_evals=20))


def test_spdy_then_evo_never_loses_algorithm_4s_best_and_resumes(tmp_path) -> None:
    table = _table(L=10, S=12, seed=3)
    errors = _errors(table)
    cfg = SearchConfig(speedup=1.7, max_evals=40, seed=1, strategy="spdy+evo")
    store = str(tmp_path / "s.journal")
    obj = SeparableObjective(errors)
    hyb = HybridSearch(table, obj, cfg, storage=store, study_name="h")
    res = hyb.run()
    alg4 = Search(table, SeparableObjective(errors), SearchConfig(speedup=1.7, max_evals=20, seed=1, strategy="spdy")).run()
    # the first half is Algorithm 4 with the same seed and budget; evo starts from its best
    assert hyb.first.result().loss == pytest.approx(alg4.loss)
    assert res.loss <= alg4.loss and res.solution.predicted_speedup >= 1.7 * (1 - 1e-9)
    phases = [h["phase"] for h in res.history]
    assert phases[0] == "random" and "seed" in phases and phases[-1] == "evo"
    assert [h["number"] for h in res.history] == sorted(h["number"] for h in res.history)
    # 20 of Algorithm 4, then the seed (scored from the cache: no call) and generations within the other 20
    assert 20 < res.n_evaluations <= 40 and sum(obj.calls) / obj.n_batches <= 39 + 1e-9
    seed = next(h for h in res.history if h["phase"] == "seed")
    assert seed["loss"] == pytest.approx(alg4.loss)
    # resumed on the same storage: both phases are done, nothing is evaluated again
    again_obj = SeparableObjective(errors)
    again = HybridSearch(table, again_obj, cfg, storage=store, study_name="h").run()
    assert again.loss == pytest.approx(res.loss) and again_obj.calls == []
    levels, sol, _loss = hyb.refine(1.9, evals=6)
    assert sol.predicted_speedup >= 1.9 * (1 - 1e-9) and np.array_equal(sol.levels, levels)
    with pytest.raises(InvalidInputError, match="at least 2"):
        HybridSearch(table, obj, SearchConfig(speedup=1.7, max_evals=1, strategy="spdy+evo"))


# -- two worker processes on one study, every storage ------------------------------------


class SlowEvo(EvoSearch):
    """An evo search whose every loss takes 50 ms, as a real model's would."""

    def _score(self, levels: np.ndarray, batches: np.ndarray | None) -> float:
        time.sleep(0.05)
        return super()._score(levels, batches)


EVO_TRIALS = 5


def evo_work(store: str) -> None:
    """One worker process of a shared evo search on ``tests.test_storage``'s table and loss."""
    from tests.test_storage import FAST_BEATS, STUDY, objective, table

    cfg = SearchConfig(speedup=2.0, max_evals=2 + 8 * (EVO_TRIALS - 2), seed=3, strategy="evo", **FAST_BEATS)
    res = SlowEvo(table(), objective, cfg, storage=store, study_name=STUDY).run()
    print(json.dumps({"evaluations": res.n_evaluations, "best": res.loss}), flush=True)


def two_workers(work: str, store: str) -> list[dict]:
    """Run ``tests.test_evo.<work>(store)`` in two processes at once; their JSON reports."""
    from tests.test_storage import ROOT

    code = f"from tests.test_evo import {work}; {work}({store!r})"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    reports = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, f"worker {p.pid} exited with {p.returncode}"
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def test_two_evo_workers_share_a_study(shared_storage: str) -> None:
    from tests.test_storage import check_every_slot_once

    reports = two_workers("evo_work", shared_storage)
    done = check_every_slot_once(shared_storage, EVO_TRIALS)
    assert all(t.user_attrs["phase"] == ("seed", "seed-uniform", "evo")[min(s, 2)] for s, t in done.items())
    assert reports[0]["best"] == reports[1]["best"] == min(t.value for t in done.values())
    assert all(r["evaluations"] == 2 + 8 * (EVO_TRIALS - 2) for r in reports)  # no batches: children scored in full


def slow_objective(levels: np.ndarray) -> float:
    """``tests.test_storage``'s loss, taking 20 ms as a real model's would."""
    from tests.test_storage import objective

    time.sleep(0.02)
    return objective(levels)


HYBRID_EVALS = 30  # 15 of Algorithm 4, then the two seeds and one generation of 8 (no batches: 8 children in full)


def hybrid_work(store: str) -> None:
    """One worker process of a shared ``spdy+evo`` search."""
    from tests.test_storage import FAST_BEATS, STUDY, table

    cfg = SearchConfig(speedup=2.0, max_evals=HYBRID_EVALS, seed=3, strategy="spdy+evo", **FAST_BEATS)
    res = HybridSearch(table(), slow_objective, cfg, storage=store, study_name=STUDY).run()
    print(json.dumps({"evaluations": res.n_evaluations, "best": res.loss}), flush=True)


def test_two_workers_share_both_phases_of_spdy_then_evo(shared_storage: str) -> None:
    import optuna

    from spdy.storage import make_storage, slots
    from tests.test_storage import COMPLETE, STUDY, check_every_slot_once

    reports = two_workers("hybrid_work", shared_storage)
    first = check_every_slot_once(shared_storage, HYBRID_EVALS // 2)  # Algorithm 4's study: each slot once
    evo = optuna.load_study(study_name=f"{STUDY}-evo", storage=make_storage(shared_storage)).get_trials()
    evo_slots = slots(evo)
    done = sorted(evo_slots[t.number] for t in evo if t.state == COMPLETE)
    assert done == [0, 1, 2]  # the seeds (Algorithm 4's best, uniform sparsity) and one generation, each once
    best = min(min(t.value for t in first.values()), min(t.value for t in evo if t.state == COMPLETE))
    assert reports[0]["best"] == reports[1]["best"] == best
    assert reports[0]["evaluations"] == reports[1]["evaluations"] == HYBRID_EVALS // 2 + 2 + 8


def test_the_uniform_seed_meets_the_budget_and_the_search_starts_no_worse_than_uniform() -> None:
    from spdy.baselines import uniform
    from spdy.evo import uniform_seed

    table = _table(L=8, S=10, seed=5)
    errors = _errors(table, 5)
    budget = table.budget_for(1.6)
    lv = uniform_seed(table, budget, np.random.default_rng(0))
    u = uniform(table, 1.6).levels
    # the uniform level, or lighter where the time left over allows: never harder, within the budget
    assert layer_times(table, lv) <= budget * (1 + 1e-12) and (lv <= u).all()
    assert uniform_seed(table, table.budget_for(1e6), np.random.default_rng(0)) is None  # no level reaches it
    res = EvoSearch(table, SeparableObjective(errors), SearchConfig(speedup=1.6, max_evals=12, seed=1, strategy="evo")).run()
    assert res.history[1]["phase"] == "seed-uniform"
    assert res.loss <= float(errors[np.arange(8), u].sum())


def test_the_global_seed_meets_the_budget_and_the_search_starts_no_worse_than_global_magnitude() -> None:
    from spdy.baselines import global_magnitude
    from spdy.evo import global_seed

    table = _table(L=8, S=10, seed=6)
    errors = _errors(table, 6)
    rng = np.random.default_rng(7)
    mags = {n: rng.standard_normal((16, 8 + 4 * i)).astype(np.float32) for i, n in enumerate(table.layers)}
    budget = table.budget_for(1.6)
    lv = global_seed(table, mags, budget, np.random.default_rng(0))
    g = global_magnitude(table, mags, 1.6).levels
    # global magnitude's levels, or lighter where the time left over allows: never harder, within the budget
    assert layer_times(table, lv) <= budget * (1 + 1e-12) and (lv <= g).all()
    assert global_seed(table, mags, table.budget_for(1e6), np.random.default_rng(0)) is None  # out of reach
    cfg = SearchConfig(speedup=1.6, max_evals=12, seed=1, strategy="evo")
    res = EvoSearch(table, SeparableObjective(errors), cfg, magnitudes=mags).run()
    assert [h["phase"] for h in res.history[:4]] == ["seed", "seed-uniform", "seed-global", "evo"]
    assert res.loss <= min(h["loss"] for h in res.history[:3])
    # without the weights there is no global seed, and the study's signature says which it was
    plain = EvoSearch(table, SeparableObjective(errors), cfg).run()
    assert [h["phase"] for h in plain.history[:3]] == ["seed", "seed-uniform", "evo"]
    signed = EvoSearch(table, SeparableObjective(errors), cfg, magnitudes=mags, signature={"model": "m"})
    assert signed.study.user_attrs["signature"]["evo_seeds"] == 3
    assert "evo_seeds" not in EvoSearch(table, SeparableObjective(errors), cfg, signature={"model": "m"}
                                        ).study.user_attrs["signature"]

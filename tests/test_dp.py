from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from spdy import dp
from spdy.errors import InfeasibleBudgetError, InvalidInputError
from spdy.grid import SparsityGrid, spdy_grid
from spdy.profile import load_profile
from spdy.types import LatencyTable


def brute_force(times: np.ndarray, errors: np.ndarray, budget: float) -> float:
    """Least summed error over every combination whose summed time fits the budget."""
    L, S = times.shape
    best = math.inf
    for combo in itertools.product(range(S), repeat=L):
        idx = (np.arange(L), np.array(combo))
        if times[idx].sum() <= budget + 1e-12:
            best = min(best, errors[idx].sum())
    return best


@pytest.mark.parametrize("seed", range(60))
def test_integer_instances_match_brute_force(seed: int) -> None:
    # integer times with one bucket per time unit: the DP is exact, so it must equal brute force
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 5))
    S = int(rng.integers(1, 5))
    times = rng.integers(0, 8, size=(L, S)).astype(float)
    errors = rng.integers(0, 4, size=(L, S)).astype(float)  # small ints: many ties
    lo, hi = times.min(axis=1).sum(), times.max(axis=1).sum()
    budget = float(rng.integers(int(lo), int(hi) + 1)) if hi > 0 else 0.0
    if budget <= 0:
        budget = 1.0
    if times.min(axis=1).sum() > budget:
        with pytest.raises(InfeasibleBudgetError):
            dp.solve_budget(times, errors, budget, buckets=int(budget))
        return
    levels, total = dp.solve_budget(times, errors, budget, buckets=int(budget))
    idx = (np.arange(L), levels)
    assert times[idx].sum() <= budget
    assert total == pytest.approx(errors[idx].sum())
    assert total == pytest.approx(brute_force(times, errors, budget))


@pytest.mark.parametrize("seed", range(40))
def test_float_instances_bracketed_by_brute_force(seed: int) -> None:
    # real-valued times: rounding up can only lose optimality, never feasibility
    rng = np.random.default_rng(1000 + seed)
    L, S = int(rng.integers(2, 5)), int(rng.integers(2, 6))
    times = rng.random((L, S))
    errors = rng.random((L, S))
    budget = float(rng.uniform(times.min(axis=1).sum() * 1.05, times.max(axis=1).sum()))
    buckets = int(rng.choice([50, 500, 5000]))
    levels, total = dp.solve_budget(times, errors, budget, buckets=buckets)
    idx = (np.arange(L), levels)
    assert times[idx].sum() <= budget
    exact = brute_force(times, errors, budget)
    assert total >= exact - 1e-12
    # against brute force on the rounded-up times, the DP is exact
    width = budget / buckets
    rounded = dp.to_buckets(times, budget, buckets) * width
    assert total == pytest.approx(brute_force(rounded, errors, buckets * width))


def test_budget_exactly_at_a_reachable_sum() -> None:
    times = np.array([[3.0, 2.0, 1.0], [4.0, 2.0, 1.0], [5.0, 3.0, 0.5]])
    errors = np.array([[0.0, 1.0, 5.0], [0.0, 1.0, 5.0], [0.0, 1.0, 5.0]])
    budget = 2.0 + 2.0 + 3.0  # exactly levels (1, 1, 1)
    # bucket widths that divide the times: rounding up loses nothing
    for buckets in (7, 70, 7000):
        levels, total = dp.solve_budget(times, errors, budget, buckets)
        assert list(levels) == [1, 1, 1]
        assert total == 3.0


def test_float_noise_at_exact_sum_stays_feasible() -> None:
    times = np.array([[0.3, 0.1], [0.3, 0.2], [0.4, 0.1]])
    errors = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 10.0]])
    budget = 0.1 + 0.2 + 0.4  # 0.7000000000000001 in float
    levels, total = dp.solve_budget(times, errors, budget, buckets=7)
    assert list(levels) == [1, 1, 0] and total == 2.0


def test_single_level_layers() -> None:
    times = np.array([[2.0], [1.0, ]])
    errors = np.array([[0.5], [0.25]])
    levels, total = dp.solve_budget(times, errors, 3.0, 3)
    assert list(levels) == [0, 0] and total == 0.75
    with pytest.raises(InfeasibleBudgetError):
        dp.solve_budget(times, errors, 2.9, 29)


def test_numba_matches_numpy_reference() -> None:
    rng = np.random.default_rng(7)
    L, S, B = 20, 42, 2000
    times = np.sort(rng.random((L, S)), axis=1)[:, ::-1]
    errors = dp.prior_errors(L, S, rng.random(L))
    T = dp.to_buckets(times, times[:, 0].sum() / 2, B)
    lv1, e1 = dp._dp_kernel(T, errors, B)
    lv2, e2 = dp.dp_numpy(T, errors, B)
    assert e1 == pytest.approx(e2)
    assert T[np.arange(L), lv1].sum() <= B
    assert errors[np.arange(L), lv1].sum() == pytest.approx(e1)


def _table(times: np.ndarray, base: float = 0.1) -> LatencyTable:
    grid = SparsityGrid(tuple(np.linspace(0, 0.9, times.shape[1])))
    return LatencyTable([f"l{i}" for i in range(times.shape[0])], grid, times, base)


def test_budget_counts_every_layer_and_base() -> None:
    times = np.array([[1.0, 0.5, 0.25], [1.0, 0.5, 0.25]])
    table = _table(times, base=1.0)
    sol = dp.solve(table, dp.prior_errors(2, 3), speedup=1.5)
    # dense 3.0 s -> 2.0 s allowed; base 1.0 leaves 1.0 s for the two layers
    assert sol.predicted_time_s <= 3.0 / 1.5 + 1e-12
    assert sol.predicted_speedup >= 1.5
    assert list(sol.levels) == [1, 1]


def test_unreachable_speedup_states_the_largest() -> None:
    table = _table(np.array([[1.0, 0.5], [1.0, 0.5]]), base=1.0)
    with pytest.raises(InfeasibleBudgetError, match=r"largest reachable speedup is 1\.500x") as info:
        dp.solve(table, dp.prior_errors(2, 2), speedup=2.0)
    assert info.value.max_speedup == pytest.approx(1.5)
    with pytest.raises(InfeasibleBudgetError):
        dp.solve(table, dp.prior_errors(2, 2), speedup=4.0)  # budget below zero


@pytest.mark.parametrize("bad", ["1", "0.5x", "-2", "nan", "abc", "1x"])
def test_bad_speedups(bad: str) -> None:
    with pytest.raises(InvalidInputError):
        dp.parse_speedup(bad)


def test_parse_speedup_forms() -> None:
    assert dp.parse_speedup("2.5x") == 2.5
    assert dp.parse_speedup("2.5X") == 2.5
    assert dp.parse_speedup("2.5") == 2.5
    assert dp.parse_speedup(3) == 3.0


def test_invalid_tables() -> None:
    grid = spdy_grid(3)
    with pytest.raises(InvalidInputError, match="non-finite"):
        LatencyTable(["a"], grid, np.array([[1.0, np.nan, 0.5, 0.2]]), 0.0)
    with pytest.raises(InvalidInputError, match=">= 0"):
        LatencyTable(["a"], grid, np.array([[1.0, -1.0, 0.5, 0.2]]), 0.0)
    with pytest.raises(InvalidInputError, match="levels per layer"):
        LatencyTable(["a"], grid, np.array([[1.0, 0.5]]), 0.0)
    table = LatencyTable(["a"], grid, np.array([[1.0, 0.8, 0.5, 0.2]]), 0.0)
    with pytest.raises(InvalidInputError, match="shape"):
        dp.solve(table, np.zeros((2, 4)), 2.0)
    with pytest.raises(InvalidInputError, match="non-finite"):
        dp.solve(table, np.array([[0.0, np.inf, 1.0, 2.0]]), 2.0)
    with pytest.raises(InvalidInputError, match="buckets"):
        dp.solve(table, dp.prior_errors(1, 4), 2.0, buckets=0)


def test_too_few_buckets_is_a_clear_error() -> None:
    # fits in real time, but one bucket per layer rounds every time up to a full bucket
    times = np.array([[1.0, 0.34], [1.0, 0.34], [1.0, 0.34]])
    with pytest.raises(InfeasibleBudgetError, match="more buckets"):
        dp.solve_budget(times, np.zeros((3, 2)), 1.05, buckets=1)


def test_reference_files_parse_and_solve(reference_dir) -> None:
    files = sorted(reference_dir.glob("*.txt"))
    assert len(files) == 8
    for f in files:
        prof = load_profile(f)
        t = prof.table
        assert len(t.grid) == 42 and t.base_s >= 0
        target = min(2.0, 0.9 * t.max_speedup())
        sol = dp.solve(t, dp.prior_errors(len(t.layers), len(t.grid)), target)
        assert sol.predicted_time_s <= t.dense_total_s / target * (1 + 1e-12)
        assert sol.predicted_speedup >= target


def test_rn50_counts_first_and_last_layers(reference_dir) -> None:
    prof = load_profile(reference_dir / "rn50_unstr.txt")
    assert prof.table.layers[0] == "conv1" and prof.table.layers[-1] == "fc"
    assert prof.table.dense_total_s == pytest.approx(0.45038264)


def test_solve_cli_json(reference_dir, capsys) -> None:
    from spdy.cli import main

    assert main(["solve", "--timings", str(reference_dir / "rn50_unstr.txt"), "--speedup", "2x", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predicted_speedup"] >= 2.0
    assert set(out) >= {"levels", "predicted_speedup", "total_error", "solve_ms"}
    assert len(out["levels"]) == 54
    assert out["solve_ms"] < 1000


def test_solve_cli_errors_file(reference_dir, tmp_path, capsys) -> None:
    from spdy.cli import main

    prof = load_profile(reference_dir / "rn18_unstr.txt")
    names = prof.table.layers
    # a huge error on every sparse level of the first layer keeps it dense
    errs = {n: [0.0] + [1.0] * 41 for n in names}
    errs[names[0]] = [0.0] + [1e6] * 41
    f = tmp_path / "errors.json"
    f.write_text(json.dumps(errs))
    assert main(["solve", "--timings", str(reference_dir / "rn18_unstr.txt"), "--speedup", "1.5", "--errors", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["levels"][names[0]] == 0.0


def test_solve_cli_unreachable_exit_code(reference_dir, capsys) -> None:
    from spdy.cli import main

    assert main(["solve", "--timings", str(reference_dir / "rn50_unstr.txt"), "--speedup", "9x"]) == 1
    assert "largest reachable speedup is 4.34" in capsys.readouterr().err

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from spdy import dp
from spdy.choices import Choice
from spdy.errors import InfeasibleBudgetError, InvalidInputError
from spdy.grid import SparsityGrid, spdy_grid
from spdy.profile import choice_table, load_profile
from spdy.types import LatencyTable, Solution
from tests.pattern_profiles import make_profile

INF = math.inf


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


# ------------------------------------------------------------------------------ N:M columns and the prior


def test_prior_at_a_tables_own_positions_is_spdys_prior_over_its_levels() -> None:
    t = make_profile(patterns=()).table
    c = np.array([0.2, 0.7, 1.0])
    S = len(t.grid)
    np.testing.assert_array_equal(dp.prior_errors(3, S, c, t.positions()), dp.prior_errors(3, S, c))
    np.testing.assert_allclose(dp.prior_errors(3, S, c), c[:, None] * (np.arange(S) / (S - 1))[None, :] ** 2)


def test_nm_prior_sits_at_its_sparsity_on_the_grid() -> None:
    grid = SparsityGrid((0.0, 0.3, 0.5, 0.7, 0.9))
    t = choice_table(make_profile(grid=grid))
    e = dp.prior_errors(3, len(grid), np.array([1.0, 2.0, 3.0]), t.positions())
    S = len(grid)
    # 2:4 and 4:8 at 50 % cost exactly what unstructured level 2 (50 %) costs, per layer
    np.testing.assert_allclose(e[:, S], e[:, 2])
    np.testing.assert_allclose(e[:, S + 1], e[:, 2])
    np.testing.assert_allclose(e[:, 2], np.array([1.0, 2.0, 3.0]) * (2 / 4) ** 2)
    with pytest.raises(InvalidInputError, match="coefficients"):
        dp.prior_errors(3, len(grid), np.ones(2), t.positions())
    with pytest.raises(InvalidInputError, match="positions"):
        dp.prior_errors(3, len(grid), None, np.ones((2, 3)))


def test_error_equivalent_positions_follow_the_database_errors() -> None:
    grid = SparsityGrid((0.0, 0.3, 0.5, 0.7, 0.9))
    t = choice_table(make_profile(grid=grid))
    errors = np.tile(np.array([0.0, 0.01, 0.02, 0.04, 0.08]), (3, 1))
    db = SimpleNamespace(layers=t.layers, patterns=("2:4",), errors=errors,
                         pattern_errors=np.array([[np.nan], [0.03], [0.08]]))
    pos = dp.error_equivalent_positions(t, db)
    S = len(grid)
    assert pos.shape == t.times.shape
    np.testing.assert_allclose(pos[:, :S], np.broadcast_to(np.arange(S, dtype=float), (3, S)))
    assert pos[0, S] == pytest.approx(2.0)  # no 2:4 in the database for layer 0: sparsity position
    assert pos[1, S] == pytest.approx(2.5) and pos[2, S] == pytest.approx(4.0)
    assert pos[1, S + 1] == pytest.approx(2.0)  # 4:8 not in the database: sparsity position
    e = dp.prior_errors(3, len(grid), None, pos)
    assert e[2, S] > e[1, S] > e[0, S]


def brute_force_available(times: np.ndarray, errors: np.ndarray, budget: float) -> float:
    """:func:`brute_force` over the finite times only."""
    L, C = times.shape
    best = math.inf
    for combo in itertools.product(range(C), repeat=L):
        idx = (np.arange(L), np.array(combo))
        if np.all(np.isfinite(times[idx])) and times[idx].sum() <= budget + 1e-9:
            best = min(best, errors[idx].sum())
    return best


GRID2 = spdy_grid(2)
COLUMNS = (Choice.dense(), Choice.unstructured(GRID2, 1), Choice.unstructured(GRID2, 2), Choice.nm("2:4"), Choice.nm("4:8"))
NM_COLUMNS = (Choice.dense(), Choice.nm("2:4"))


@pytest.mark.parametrize("seed", range(40))
def test_dp_over_mixed_choices_matches_brute_force(seed: int) -> None:
    # integer times, base 0 and one bucket per time unit: the DP is exact
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 5))
    C = len(COLUMNS)
    times = rng.integers(0, 8, size=(L, C)).astype(float)
    times[:, 0] = rng.integers(4, 9, size=L)
    times[:, 1:][rng.random((L, C - 1)) < 0.35] = INF  # choices some layers do not have
    errors = rng.integers(0, 4, size=(L, C)).astype(float)
    errors[:, 0] = 0.0
    table = LatencyTable(tuple(f"l{i}" for i in range(L)), GRID2, times, 0.0, choices=COLUMNS)
    fastest = table.fastest_total_s()
    dense = table.dense_total_s
    if fastest >= dense:
        with pytest.raises(InfeasibleBudgetError) as info:
            dp.solve(table, errors, 1.01)
        assert info.value.max_speedup == pytest.approx(dense / fastest)
        return
    budget = float(rng.integers(int(math.ceil(fastest)), int(dense)))  # an integer budget in reach
    budget = max(budget, 1.0)
    speedup = dense / budget
    sol = dp.solve(table, errors, speedup, buckets=int(budget))
    idx = (np.arange(L), sol.levels)
    assert np.all(table.available[idx]), "the DP picked a choice a layer does not have"
    assert times[idx].sum() <= budget + 1e-9
    assert sol.total_error == pytest.approx(errors[idx].sum())
    assert sol.total_error == pytest.approx(brute_force_available(times, errors, budget))
    assert sol.choices == tuple(COLUMNS[int(c)] for c in sol.levels)
    assert sol.predicted_time_s == pytest.approx(times[idx].sum())


def test_solution_names_each_layers_pattern() -> None:
    prof = make_profile(L=4)
    t = choice_table(prof, unstructured=False)  # dense or 2:4 (4:8 has no kernel)
    sol = dp.solve(t, dp.prior_errors(4, len(t.grid), None, t.positions()), 1.25)
    assert isinstance(sol, Solution)
    assert {c.pattern for c in sol.choices} <= {"dense", "2:4"}
    assert sol.choices[0].pattern == "dense"  # layer 0 has no 2:4 kernel
    assert sol.pattern_counts()["2:4"] >= 1
    js = json.loads(json.dumps(sol.to_json()))
    assert set(js["layers"]) == {"l0", "l1", "l2", "l3"}
    for name, c in sol.as_choices().items():
        assert js["layers"][name]["pattern"] == c.pattern and js["layers"][name]["sparsity"] == c.sparsity
        assert js["layers"][name]["format"] == ("2:4" if c.is_nm else "dense")
    assert js["predicted_speedup"] >= 1.25 and js["patterns"] == sol.pattern_counts()


def test_a_layer_without_an_nm_choice_never_gets_one() -> None:
    rng = np.random.default_rng(3)
    prof = make_profile(L=5)
    t = choice_table(prof)
    S = len(prof.table.grid)
    errors = dp.prior_errors(5, S, rng.random(5), t.positions())
    errors[0, S:] = -1.0  # even a "negative error" for layer 0's unavailable N:M columns is ignored
    for speedup in (1.1, 1.3, 1.6, 2.0):
        for _ in range(10):
            e = dp.prior_errors(5, S, rng.random(5), t.positions())
            e[0, S:] = 0.0
            sol = dp.solve(t, e, speedup)
            assert not sol.choices[0].is_nm
            assert all(c.pattern != "4:8" for c in sol.choices)
    # a speedup that only 2:4 on layer 0 could reach is out of reach, with the right maximum
    dense_only = LatencyTable(("a", "b"), GRID2, [[1.0, INF], [1.0, 0.5]], 0.0, choices=NM_COLUMNS)
    with pytest.raises(InfeasibleBudgetError, match=r"largest reachable speedup is 1\.333x") as info:
        dp.solve(dense_only, np.zeros((2, 2)), 1.5)
    assert info.value.max_speedup == pytest.approx(2 / 1.5)


def test_solve_refuses_non_finite_scores_of_available_choices() -> None:
    t = LatencyTable(("a",), GRID2, [[1.0, 0.5]], 0.0, choices=NM_COLUMNS)
    with pytest.raises(InvalidInputError, match=r"non-finite value \(nan\) at layer 0 \('a'\), level 1 \(2:4\)"):
        dp.solve(t, np.array([[0.0, np.nan]]), 1.5)
    # scores of choices a layer does not have are ignored, NaN included
    t2 = LatencyTable(("a", "b"), GRID2, [[1.0, INF], [1.0, 0.5]], 0.0, choices=NM_COLUMNS)
    sol = dp.solve(t2, np.array([[0.0, np.nan], [0.0, 0.1]]), 1.2)
    assert [c.pattern for c in sol.choices] == ["dense", "2:4"]


def test_dp_unavailable_times_need_the_flag() -> None:
    times = np.array([[1.0, INF], [1.0, 0.4]])
    with pytest.raises(InvalidInputError, match="finite"):
        dp.solve_budget(times, np.zeros((2, 2)), 1.5)
    levels, total = dp.solve_budget(times, np.array([[0.0, 0.0], [1.0, 0.5]]), 1.5, allow_unavailable=True)
    assert levels.tolist() == [0, 1] and total == 0.5
    with pytest.raises(InvalidInputError, match="no available choice"):
        dp.solve_budget(np.array([[INF, INF]]), np.zeros((1, 2)), 1.0, allow_unavailable=True)
    with pytest.raises(InvalidInputError, match="finite"):
        dp.solve_budget(np.array([[1.0, -INF]]), np.zeros((1, 2)), 1.0, allow_unavailable=True)


def brute_force_table(table: LatencyTable, errors: np.ndarray, budget: float) -> float:
    """Least summed error over every column combination whose predicted layer time (fused pairs'
    savings taken off, :meth:`LatencyTable.predicted_time`) fits the budget."""
    L, C = table.times.shape
    best = math.inf
    for combo in itertools.product(range(C), repeat=L):
        lv = np.array(combo)
        if table.predicted_time(lv) - table.base_s <= budget + 1e-9:
            best = min(best, errors[np.arange(L), lv].sum())
    return best


@pytest.mark.parametrize("seed", range(40))
def test_dp_with_fused_pairs_matches_brute_force(seed: int) -> None:
    # integer times, savings and budget, one bucket per time unit (after the DP's shift): exact
    from spdy.types import FusedPair

    rng = np.random.default_rng(500 + seed)
    L = int(rng.integers(2, 6))
    C = 3
    times = rng.integers(0, 8, size=(L, C)).astype(float)
    errors = rng.integers(0, 5, size=(L, C)).astype(float)
    formats = tuple(tuple(rng.choice(["dense", "csr", "bcsr4x1", "csr-1t", "dnnl"]) for _ in range(C)) for _ in range(L))
    order = rng.permutation(L)
    pairs = tuple(FusedPair(int(order[2 * k]), int(order[2 * k + 1]), float(rng.integers(0, 10)))
                  for k in range(int(rng.integers(1, L // 2 + 1))))
    table = LatencyTable(tuple(f"l{i}" for i in range(L)), spdy_grid(C - 1), times, 1.0, formats=formats, fused=pairs)
    shift = -sum(min(0.0, float(table.pair_times(p).min())) for p in pairs)
    lo = table.fastest_total_s() - table.base_s
    hi = float(times.max(axis=1).sum())
    budget = float(rng.integers(int(math.ceil(lo)), int(max(lo, hi)) + 1))
    if budget + shift < 1:
        return
    levels, total = dp.solve_table(table, errors, budget, buckets=int(budget + shift))
    assert table.predicted_time(levels) - table.base_s <= budget + 1e-9
    assert total == pytest.approx(errors[np.arange(L), levels].sum())
    assert total == pytest.approx(brute_force_table(table, errors, budget))


def test_a_fused_pair_that_saves_more_than_its_layers_take_leaves_a_negative_budget_in_reach() -> None:
    # a tiny model: the pair's saving (the GELU, residual and LayerNorm of the base) outweighs its
    # layers, so the predicted dense total is below the base and the layers' budget is below zero
    from spdy.types import FusedPair

    formats = (("dense", "csr", "csr"), ("dense", "csr", "csr"), ("dense", "csr", "csr"))
    times = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [2.0, 1.5, 1.0]])
    table = LatencyTable(("up", "down", "other"), spdy_grid(2), times, 10.0, formats=formats,
                         fused=(FusedPair(0, 1, 8.0),))
    assert table.dense_total_s == 18.0 and table.fastest_total_s() == 10.0 + (1 + 1 - 8) + 1.0
    assert table.max_speedup() == pytest.approx(18.0 / 5.0)
    errors = np.array([[0.0, 1, 3], [0, 1, 3], [0, 2, 5]])
    target = 1.0 + 0.9 * (table.max_speedup() - 1.0)
    assert table.budget_for(target) < 0
    sol = dp.solve(table, errors, target, buckets=2000)
    assert table.predicted_time(sol.levels) <= 18.0 / target + 1e-9
    assert sol.total_error == pytest.approx(brute_force_table(table, errors, table.budget_for(target)))
    with pytest.raises(InfeasibleBudgetError, match="largest reachable speedup is 3.600x"):
        dp.solve(table, errors, 3.7)


def test_fused_pairs_in_the_table() -> None:
    from spdy.types import FusedPair

    formats = (("dnnl", "csr", "csr-1t"), ("dense", "bcsr4x1", "csr"), ("dense", "csr", "csr"))
    times = np.array([[10.0, 4.0, 3.0], [10.0, 5.0, 4.0], [10.0, 5.0, 4.0]])
    table = LatencyTable(("up", "down", "other"), spdy_grid(2), times, 2.0, formats=formats,
                         fused=(FusedPair(0, 1, 6.0),))
    assert table.dense_total_s == 32.0
    assert table.predicted_time([1, 1, 0]) == 2 + 4 + 5 + 10 - 6  # both fuse
    assert table.predicted_time([2, 1, 0]) == 2 + 3 + 5 + 10  # csr-1t does not
    assert table.fastest_total_s() == 2 + (4 + 4 - 6) + 4
    assert table.fusable.tolist() == [[False, True, False], [False, True, True], [False, True, True]]
    # the DP sees the saving: at 14 s of layer time only the fused pair and 'other' pruned fit
    levels, _ = dp.solve_table(table, np.array([[0.0, 1, 2], [0, 1, 2], [0, 1, 2]]), 7.0, buckets=700)
    assert levels.tolist() == [1, 1, 2] or levels.tolist() == [1, 2, 1]
    with pytest.raises(InvalidInputError, match="need the table's formats"):
        LatencyTable(("a", "b"), spdy_grid(2), times[:2], 0.0, fused=(FusedPair(0, 1, 1.0),))
    with pytest.raises(InvalidInputError, match="none in another pair"):
        LatencyTable(("up", "down", "other"), spdy_grid(2), times, 0.0, formats=formats,
                     fused=(FusedPair(0, 1, 1.0), FusedPair(1, 2, 1.0)))
    with pytest.raises(InvalidInputError, match="finite and >= 0"):
        LatencyTable(("up", "down", "other"), spdy_grid(2), times, 0.0, formats=formats, fused=(FusedPair(0, 1, -1.0),))
    back = FusedPair.from_json(table.fused[0].to_json(table.layers), table.layers)
    assert back == table.fused[0]


def test_planned_layers_in_the_table() -> None:
    # one transformer layer: query, key, value, attention output, up and down projections; the
    # times already hold the planned layer's credits (2 s a group: the pair's saving holds its own)
    from spdy.types import FusedPair, PlannedLayer

    names = ("q", "k", "v", "o", "up", "down")
    fused = ("dense", "csr", "bcsr4x1")
    formats = tuple(fused for _ in names)
    times = np.array([[10.0, 4.0, 3.0]] * 6)
    share = 2.0
    table = LatencyTable(names, spdy_grid(2), times, 1.0, formats=formats, fused=(FusedPair(4, 5, 3.0 + share),),
                         planned=(PlannedLayer((0, 1, 2, 3, 4, 5), share),))
    # every projection fuses: the credits stand
    assert table.predicted_time([1] * 6) == 1 + 6 * 4 - (3 + share)
    # the query dense: no plan, so its credits come back (the key's and value's thirds, the output's
    # share, the pair's share)
    assert table.predicted_time([0, 1, 1, 1, 1, 1]) == pytest.approx(1 + 10 + 5 * 4 - (3 + share) + share * (2 / 3 + 1 + 1))
    # the feed-forward dense: the pair neither saves nor was credited
    assert table.predicted_time([1, 1, 1, 1, 0, 0]) == pytest.approx(1 + 4 * 4 + 20 + share * (1 + 1))
    assert table.planned_taken_back(np.zeros(6, dtype=np.int64)) == 0.0
    g = table.planned[0]
    assert g.taken_back([True] * 6) == 0.0 and g.taken_back([False] * 6) == 0.0
    # the in-model fit credits the query, key and value together, only where all three fuse
    assert g.taken_back([False, True, True, True, True, True], whole_triple=True) == pytest.approx(share * 2)
    assert g.taken_back([True, True, True, False, True, True], whole_triple=True) == pytest.approx(share * 2)
    assert PlannedLayer.from_json(g.to_json(names), names) == g
    with pytest.raises(InvalidInputError, match="need the table's formats"):
        LatencyTable(names, spdy_grid(2), times, 0.0, planned=(g,))
    with pytest.raises(InvalidInputError, match="six distinct layers"):
        LatencyTable(names, spdy_grid(2), times, 0.0, formats=formats, planned=(PlannedLayer((0, 0, 1, 2, 3, 4), 1.0),))
    with pytest.raises(InvalidInputError, match="finite and >= 0"):
        LatencyTable(names, spdy_grid(2), times, 0.0, formats=formats, planned=(PlannedLayer((0, 1, 2, 3, 4, 5), -1.0),))
    with pytest.raises(InvalidInputError, match="six layers of the table"):
        PlannedLayer.from_json({"members": ["q", "k"], "share_s": 1.0}, names)

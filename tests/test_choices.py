"""Per-layer choices (dense, unstructured levels, N:M): bookkeeping, the DP over them, profiles."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from spdy import choices as ch
from spdy import dp
from spdy.choices import Choice, ChoiceSolution, ChoiceTable, NMPattern
from spdy.errors import InfeasibleBudgetError, InvalidInputError
from spdy.grid import DEFAULT_GRID, SparsityGrid, spdy_grid
from spdy.profile import Profile, load_profile, save_profile
from spdy.sensitivity import Search, SearchConfig
from spdy.types import LatencyTable, LayerSpec

INF = math.inf


# ------------------------------------------------------------------------------ choices


def test_patterns_parse_and_validate() -> None:
    assert ch.parse_pattern("2:4") == NMPattern(2, 4)
    assert ch.parse_pattern(" 4:8 ").sparsity == 0.5
    assert ch.parse_patterns("2:4,4:8,2:4") == ("2:4", "4:8")
    assert ch.parse_patterns(["4:8", NMPattern(2, 4)]) == ("4:8", "2:4")
    assert ch.parse_patterns(None) == () and ch.parse_patterns("") == ()
    for bad in ("2/4", "4:2", "0:4", "2:4:8", "a:b"):
        with pytest.raises(InvalidInputError):
            ch.parse_pattern(bad)
    assert NMPattern(2, 4).fits(768) and not NMPattern(4, 8).fits(36)
    assert NMPattern(4, 8).why_not(36) == "input size 36 is not a multiple of 8"


def test_choice_validation_and_json() -> None:
    grid = spdy_grid(4)
    dense, u2, nm = Choice.dense(), Choice.unstructured(grid, 2), Choice.nm("2:4")
    assert dense == Choice("dense", 0.0, 0) and Choice.unstructured(grid, 0) == dense
    assert u2 == Choice("unstructured", grid[2], 2) and u2.label.startswith("unstructured ")
    assert nm == Choice("2:4", 0.5, 0) and nm.is_nm and nm.nm_pattern == NMPattern(2, 4) and nm.label == "2:4"
    for c in (dense, u2, nm, Choice.nm("4:8")):
        assert Choice.from_json(json.loads(json.dumps(c.to_json()))) == c
    for args in (("dense", 0.5, 0), ("unstructured", 0.0, 0), ("2:4", 0.6, 0), ("2:4", 0.5, 3), ("2 : 4", 0.5, 0),
                 ("x", 0.5, 0)):
        with pytest.raises(InvalidInputError):
            Choice(*args)
    with pytest.raises(InvalidInputError, match="not on the grid"):
        Choice.unstructured(grid, 9)
    with pytest.raises(InvalidInputError):
        Choice.from_json({"pattern": "2:4"})


def test_grid_position_of_a_sparsity() -> None:
    grid = spdy_grid(8)
    for i, s in enumerate(grid.levels):
        assert ch.grid_position(grid, s) == pytest.approx(i)
    # 2:4 and 4:8 (50 %) on SPDY's 42-level grid sit between levels 2 (45.8 %) and 3 (51.1 %)
    assert 2.7 < ch.grid_position(DEFAULT_GRID, 0.5) < 2.85
    assert ch.grid_position(grid, 0.999) == len(grid) - 1


# ------------------------------------------------------------------------------ tables


def make_profile(L: int = 3, grid: SparsityGrid | None = None, patterns=("2:4", "4:8"), seed: int = 0) -> Profile:
    grid = grid or spdy_grid(4)
    rng = np.random.default_rng(seed)
    dense = rng.uniform(1.0, 2.0, L)
    times = dense[:, None] * np.linspace(1.0, 0.3, len(grid))[None, :]
    times[:, 1] = dense  # level 1 runs in the dense format: same time as dense
    pt = np.full((L, len(patterns)), INF)
    pf = [["" for _ in patterns] for _ in range(L)]
    for i in range(L):
        if "2:4" in patterns and i != 0:  # layer 0 has no 2:4 kernel
            k = patterns.index("2:4")
            pt[i, k] = 0.6 * dense[i]
            pf[i][k] = "2:4"
    specs = [LayerSpec(f"l{i}", "linear", (64, 64), (1, 8, 64)) for i in range(L)]
    table = LatencyTable([s.name for s in specs], grid, times, 0.5, {"gpu": "test"})
    formats = tuple(("dense",) * 2 + ("csr",) * (len(grid) - 2) for _ in range(L))
    return Profile(table, backend="torch-cuda", model="toy", specs=specs, formats=formats, patterns=tuple(patterns),
                   pattern_times=pt, pattern_formats=tuple(tuple(r) for r in pf), pattern_spread=np.zeros((L, len(patterns))))


def test_choice_table_from_a_profile() -> None:
    prof = make_profile()
    t = ch.choice_table(prof)
    S = len(prof.table.grid)
    assert t.choices[0] == Choice.dense() and t.choices[S:] == (Choice.nm("2:4"), Choice.nm("4:8"))
    assert t.times.shape == (3, S + 2) and not t.times.flags.writeable
    np.testing.assert_array_equal(t.times[:, :S], prof.table.times)
    assert t.available[:, S].tolist() == [False, True, True]  # layer 0: no 2:4 kernel
    assert not t.available[:, S + 1].any()  # 4:8: no kernel anywhere
    assert t.formats[1][S] == "2:4" and t.formats[0][S] == "" and t.formats[1][2] == "csr"
    assert t.dense_total_s == pytest.approx(prof.table.dense_total_s)
    assert t.patterns() == ("2:4", "4:8")
    only = ch.choice_table(prof, patterns="2:4", unstructured=False)
    assert only.choices == (Choice.dense(), Choice.nm("2:4")) and only.times.shape == (3, 2)
    with pytest.raises(InvalidInputError, match="no times for pattern.*1:4.*--patterns"):
        ch.choice_table(prof, patterns=["1:4"])
    plain = ch.choice_table(make_profile(patterns=()))
    assert plain.patterns() == () and plain.times.shape == (3, S)


def test_choice_table_only_offers_what_the_database_holds(caplog) -> None:
    prof = make_profile()
    db = SimpleNamespace(layers=prof.table.layers, patterns=("2:4",),
                         has_pattern=lambda i, p: p == "2:4" and i != 2)  # layer 2: input not a multiple of 4
    t = ch.choice_table(prof, database=db)
    assert t.patterns() == ("2:4",)  # 4:8 is not in the database: left out, with a warning
    assert "no 4:8 reconstructions" in caplog.text
    S = len(prof.table.grid)
    assert t.available[:, S].tolist() == [False, True, False]


def test_choice_table_refuses_bad_tables() -> None:
    grid = spdy_grid(2)
    cols = (Choice.dense(), Choice.nm("2:4"))
    with pytest.raises(InvalidInputError, match="column 0"):
        ChoiceTable(("a",), cols[::-1], [[1.0, 1.0]], 0.0, grid)
    with pytest.raises(InvalidInputError, match="no dense time"):
        ChoiceTable(("a",), cols, [[INF, 1.0]], 0.0, grid)
    with pytest.raises(InvalidInputError, match=">= 0"):
        ChoiceTable(("a",), cols, [[1.0, np.nan]], 0.0, grid)
    with pytest.raises(InvalidInputError, match="shape"):
        ChoiceTable(("a",), cols, [[1.0, 1.0, 1.0]], 0.0, grid)
    with pytest.raises(InvalidInputError, match="not a level"):
        ChoiceTable(("a",), (Choice.dense(), Choice("unstructured", 0.3, 1)), [[1.0, 1.0]], 0.0, grid)
    t = ChoiceTable(("a", "b"), cols, [[1.0, INF], [1.0, 0.5]], 0.0, grid)
    with pytest.raises(InvalidInputError, match=r"\['a'\] get a choice they do not have"):
        t.choices_of([1, 1])
    assert t.choices_of([0, 1]) == {"a": Choice.dense(), "b": Choice.nm("2:4")}


# ------------------------------------------------------------------------------ priors


def test_prior_over_grid_levels_is_spdys_prior() -> None:
    prof = make_profile(patterns=())
    t = ch.choice_table(prof)
    c = np.array([0.2, 0.7, 1.0])
    np.testing.assert_allclose(ch.prior_errors(t, c), dp.prior_errors(3, len(prof.table.grid), c))


def test_nm_prior_sits_at_its_sparsity_on_the_grid() -> None:
    grid = SparsityGrid((0.0, 0.3, 0.5, 0.7, 0.9))
    t = ch.choice_table(make_profile(grid=grid))
    e = ch.prior_errors(t, np.array([1.0, 2.0, 3.0]))
    S = len(grid)
    # 2:4 and 4:8 at 50 % cost exactly what unstructured level 2 (50 %) costs, per layer
    np.testing.assert_allclose(e[:, S], e[:, 2])
    np.testing.assert_allclose(e[:, S + 1], e[:, 2])
    np.testing.assert_allclose(e[:, 2], np.array([1.0, 2.0, 3.0]) * (2 / 4) ** 2)
    with pytest.raises(InvalidInputError, match="coefficients"):
        ch.prior_errors(t, np.ones(2))
    with pytest.raises(InvalidInputError, match="positions"):
        ch.prior_errors(t, None, np.ones(3))


def test_error_equivalent_positions_follow_the_database_errors() -> None:
    grid = SparsityGrid((0.0, 0.3, 0.5, 0.7, 0.9))
    t = ch.choice_table(make_profile(grid=grid))
    errors = np.tile(np.array([0.0, 0.01, 0.02, 0.04, 0.08]), (3, 1))
    db = SimpleNamespace(layers=t.layers, patterns=("2:4",), errors=errors,
                         pattern_errors=np.array([[np.nan], [0.03], [0.08]]))
    pos = ch.error_equivalent_positions(t, db)
    S = len(grid)
    assert pos.shape == t.times.shape
    np.testing.assert_allclose(pos[:, :S], np.broadcast_to(np.arange(S, dtype=float), (3, S)))
    assert pos[0, S] == pytest.approx(2.0)  # no 2:4 in the database for layer 0: sparsity position
    assert pos[1, S] == pytest.approx(2.5) and pos[2, S] == pytest.approx(4.0)
    assert pos[1, S + 1] == pytest.approx(2.0)  # 4:8 not in the database: sparsity position
    e = ch.prior_errors(t, None, pos)
    assert e[2, S] > e[1, S] > e[0, S]


# ------------------------------------------------------------------------------ the DP


def brute_force(times: np.ndarray, errors: np.ndarray, budget: float) -> float:
    L, C = times.shape
    best = math.inf
    for combo in itertools.product(range(C), repeat=L):
        idx = (np.arange(L), np.array(combo))
        if np.all(np.isfinite(times[idx])) and times[idx].sum() <= budget + 1e-9:
            best = min(best, errors[idx].sum())
    return best


GRID2 = spdy_grid(2)
COLUMNS = (Choice.dense(), Choice.unstructured(GRID2, 1), Choice.unstructured(GRID2, 2), Choice.nm("2:4"), Choice.nm("4:8"))


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
    table = ChoiceTable(tuple(f"l{i}" for i in range(L)), COLUMNS, times, 0.0, GRID2)
    fastest = table.fastest_total_s()
    dense = table.dense_total_s
    if fastest >= dense:
        with pytest.raises(InfeasibleBudgetError) as info:
            ch.solve(table, errors, 1.01)
        assert info.value.max_speedup == pytest.approx(dense / fastest)
        return
    budget = float(rng.integers(int(math.ceil(fastest)), int(dense)))  # an integer budget in reach
    budget = max(budget, 1.0)
    speedup = dense / budget
    sol = ch.solve(table, errors, speedup, buckets=int(budget))
    idx = (np.arange(L), sol.levels)
    assert np.all(table.available[idx]), "the DP picked a choice a layer does not have"
    assert times[idx].sum() <= budget + 1e-9
    assert sol.total_error == pytest.approx(errors[idx].sum())
    assert sol.total_error == pytest.approx(brute_force(times, errors, budget))
    assert sol.choices == tuple(COLUMNS[int(c)] for c in sol.levels)
    assert sol.predicted_time_s == pytest.approx(times[idx].sum())


def test_solution_names_each_layers_pattern() -> None:
    prof = make_profile(L=4)
    t = ch.choice_table(prof, unstructured=False)  # dense or 2:4 (4:8 has no kernel)
    sol = ch.solve(t, ch.prior_errors(t), 1.25)
    assert isinstance(sol, ChoiceSolution)
    assert {c.pattern for c in sol.choices} <= {"dense", "2:4"}
    assert sol.choices[0].pattern == "dense"  # layer 0 has no 2:4 kernel
    assert sol.pattern_counts()["2:4"] >= 1
    js = json.loads(json.dumps(sol.to_json()))
    assert set(js["layers"]) == {"l0", "l1", "l2", "l3"}
    for name, c in sol.as_dict().items():
        assert js["layers"][name]["pattern"] == c.pattern and js["layers"][name]["sparsity"] == c.sparsity
        assert js["layers"][name]["format"] == ("2:4" if c.is_nm else "dense")
    assert js["predicted_speedup"] >= 1.25 and js["patterns"] == sol.pattern_counts()


def test_a_layer_without_an_nm_choice_never_gets_one() -> None:
    rng = np.random.default_rng(3)
    prof = make_profile(L=5)
    t = ch.choice_table(prof)
    S = len(prof.table.grid)
    errors = ch.prior_errors(t, rng.random(5))
    errors[0, S:] = -1.0  # even a "negative error" for layer 0's unavailable N:M columns is ignored
    for speedup in (1.1, 1.3, 1.6, 2.0):
        for _ in range(10):
            e = ch.prior_errors(t, rng.random(5))
            e[0, S:] = 0.0
            sol = ch.solve(t, e, speedup)
            assert not sol.choices[0].is_nm
            assert all(c.pattern != "4:8" for c in sol.choices)
    # a speedup that only 2:4 on layer 0 could reach is out of reach, with the right maximum
    dense_only = ChoiceTable(("a", "b"), (Choice.dense(), Choice.nm("2:4")), [[1.0, INF], [1.0, 0.5]], 0.0, GRID2)
    with pytest.raises(InfeasibleBudgetError, match=r"largest reachable speedup is 1\.333x") as info:
        ch.solve(dense_only, np.zeros((2, 2)), 1.5)
    assert info.value.max_speedup == pytest.approx(2 / 1.5)


def test_solve_refuses_non_finite_scores_of_available_choices() -> None:
    t = ChoiceTable(("a",), (Choice.dense(), Choice.nm("2:4")), [[1.0, 0.5]], 0.0, GRID2)
    with pytest.raises(InvalidInputError, match="choice 2:4 is nan"):
        ch.solve(t, np.array([[0.0, np.nan]]), 1.5)
    # scores of choices a layer does not have are ignored, NaN included
    t2 = ChoiceTable(("a", "b"), (Choice.dense(), Choice.nm("2:4")), [[1.0, INF], [1.0, 0.5]], 0.0, GRID2)
    sol = ch.solve(t2, np.array([[0.0, np.nan], [0.0, 0.1]]), 1.2)
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


def test_search_runs_over_a_choice_table() -> None:
    prof = make_profile(L=4)
    t = ch.choice_table(prof)
    seen = []

    def objective(levels: np.ndarray) -> float:
        chosen = t.choices_of(levels)  # column indices -> Choice per layer
        seen.append(chosen)
        return sum(c.sparsity ** 2 * (1 + i) for i, c in enumerate(chosen.values()))

    res = Search(t, objective, SearchConfig(speedup=1.3, max_evals=12, seed=1)).run()
    assert isinstance(res.solution, ChoiceSolution) and res.n_evaluations == 12
    assert res.solution.predicted_speedup >= 1.3
    assert all(isinstance(c, Choice) for chosen in seen for c in chosen.values())
    assert not res.solution.choices[0].is_nm


# ------------------------------------------------------------------------------ profiles


def test_profile_with_pattern_times_round_trips(tmp_path) -> None:
    prof = make_profile()
    path = tmp_path / "p.json"
    save_profile(prof, path)
    data = json.loads(path.read_text())
    assert data["patterns"] == ["2:4", "4:8"]
    assert data["layers"][0]["patterns"] == {}  # no kernel: nothing recorded (no inf in JSON)
    assert data["layers"][1]["patterns"]["2:4"]["format"] == "2:4"
    back = load_profile(path)
    assert back.patterns == ("2:4", "4:8")
    np.testing.assert_array_equal(back.pattern_times, prof.pattern_times)
    assert back.pattern_formats == prof.pattern_formats
    np.testing.assert_array_equal(ch.choice_table(back).times, ch.choice_table(prof).times)
    # with_validation keeps the patterns
    assert back.with_validation([{"predicted_s": 1.0, "measured_s": 1.0}]).patterns == back.patterns


def test_profiles_without_patterns_still_load(tmp_path) -> None:
    prof = make_profile(patterns=())
    data = prof.to_json()
    assert "patterns" not in data and all("patterns" not in rec for rec in data["layers"])
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    back = load_profile(path)
    assert back.patterns == () and back.pattern_times is None
    bad = make_profile().to_json()
    bad["layers"][1]["patterns"]["1:4"] = {"time_s": 1.0}
    path.write_text(json.dumps(bad))
    with pytest.raises(InvalidInputError, match="1:4"):
        load_profile(path)
    with pytest.raises(InvalidInputError, match="pattern_times has shape"):
        Profile(prof.table, patterns=("2:4",), pattern_times=np.zeros((2, 1)))
    with pytest.raises(InvalidInputError, match=r"\+inf"):
        Profile(prof.table, patterns=("2:4",), pattern_times=np.full((3, 1), np.nan))


def test_backend_plan_runs_each_layer_as_chosen() -> None:
    import torch

    from spdy.profilers import LayerChoice, backend_plan

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4, bias=False))
    weights = {("0", "2:4"): np.full((8, 8), 2.0, np.float32), ("1", 0): np.ones((4, 8), np.float32)}
    db = SimpleNamespace(weight=lambda name, c: weights[(name, c.pattern if c.is_nm else c.level)])
    sol = ChoiceSolution(layers=("0", "1"), levels=np.array([3, 0]), choices=(Choice.nm("2:4"), Choice.dense()),
                         predicted_time_s=1.0, predicted_speedup=1.2, total_error=0.0, formats=("2:4", "dense"))
    plan = backend_plan(sol, db, model)
    assert isinstance(plan["0"], LayerChoice) and plan["0"].fmt == "2:4" and plan["0"].sparsity == 0.5
    np.testing.assert_array_equal(plan["0"].weight, weights[("0", "2:4")])
    np.testing.assert_array_equal(plan["0"].bias, model[0].bias.detach().numpy())
    assert plan["1"].fmt == "dense" and plan["1"].bias is None
    with pytest.raises(InvalidInputError, match="no kernel format"):
        backend_plan({"0": Choice.nm("2:4")}, db, model, formats={"0": ""})

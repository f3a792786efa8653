"""scripts/bench_thread_state.py: cycles split into a fast and a slow state by the gain from the second thread."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from _common import split_states  # noqa: E402
from bench_thread_state import COLUMNS, interleaved_ms, state_rows  # noqa: E402


def test_two_clusters_of_gains_split_at_the_widest_gap() -> None:
    gains = [1.85, 1.43, 1.88, 1.41, 1.87, 1.86, 1.44]
    assert split_states(gains, gap=0.15) == [1, 0, 1, 0, 1, 1, 0]


def test_one_state_when_no_gap_is_wide_enough_or_one_side_is_a_lone_outlier() -> None:
    assert split_states([1.85, 1.80, 1.90, 1.83, 1.87], gap=0.15) == [1] * 5
    assert split_states([1.85, 1.20, 1.88, 1.86, 1.87], gap=0.15) == [1] * 5  # one slow cycle is no state
    assert split_states([1.85, 1.4, 1.86], gap=0.15) == [1] * 3  # too few cycles to tell


def test_state_rows_take_medians_and_the_pruned_models_speedups_per_state() -> None:
    fast = {"ort_1t_cpu_a": 34.0, "ort_1t_cpu_b": 34.0, "ort_2t": 18.0, "dense_plan": 16.0, "pruned": 6.0}
    slow = {"ort_1t_cpu_a": 34.0, "ort_1t_cpu_b": 34.0, "ort_2t": 24.0, "dense_plan": 19.2, "pruned": 7.5}
    cycles = [{**c, "gain_2t": 34.0 / c["ort_2t"]} for c in (fast, slow, fast, slow, fast)]
    rows = state_rows(cycles, [1, 0, 1, 0, 1])
    assert rows["fast"]["cycles"] == 3 and rows["slow"]["cycles"] == 2
    assert all(rows["slow"][c] == slow[c] for c in COLUMNS)
    assert rows["fast"]["pruned_over_ort_2t"] == pytest.approx(3.0)
    assert rows["slow"]["pruned_over_ort_2t"] == pytest.approx(3.2)
    assert rows["slow"]["pruned_over_dense_plan"] == pytest.approx(2.56)
    assert rows["fast"]["gain_2t"] == pytest.approx(34 / 18)
    assert set(state_rows(cycles[::2], [1, 1, 1])) == {"fast"}


def test_interleaved_calls_take_turns() -> None:
    calls: list[str] = []
    got = interleaved_ms([lambda: calls.append("a"), lambda: calls.append("b")], 3)
    assert calls == ["a", "b"] * 3 and len(got) == 2 and all(t >= 0 for t in got)

"""scripts/bench_thread_state.py: cycles split into a fast and a slow state by the gain from the second thread."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_thread_state import COLUMNS, interleaved_ms, state_rows  # noqa: E402


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

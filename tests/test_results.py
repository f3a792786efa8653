"""spdy.results: the rounds of a search split by the machine's state."""

from __future__ import annotations

import numpy as np
import pytest

from spdy.profilers.dense_runtimes import DENSE_PLAN, ONNXRUNTIME, STATE_PROBE, TORCH
from spdy.results import Outcome, split_states
from spdy.types import Solution


def test_two_clusters_of_gains_split_at_the_widest_gap() -> None:
    gains = [1.85, 1.43, 1.88, 1.41, 1.87, 1.86, 1.44]
    assert split_states(gains, gap=0.15) == [1, 0, 1, 0, 1, 1, 0]


def test_one_state_when_no_gap_is_wide_enough_or_one_side_is_a_lone_outlier() -> None:
    assert split_states([1.85, 1.80, 1.90, 1.83, 1.87], gap=0.15) == [1] * 5
    assert split_states([1.85, 1.20, 1.88, 1.86, 1.87], gap=0.15) == [1] * 5  # one slow round is no state
    assert split_states([1.85, 1.4, 1.86], gap=0.15) == [1] * 3  # too few rounds to tell


def _outcome(samples: dict[str, list[float]]) -> Outcome:
    sol = Solution(("a",), np.array([1]), np.array([0.5]), 0.5, 2.0, 0.1)
    return Outcome("spdy", sol, 0.1, runtime_samples={k: tuple(v) for k, v in samples.items()},
                   runtime_speedups={k: float(np.median(v)) for k, v in samples.items()})


def _rounds(states: str) -> dict[str, list[float]]:
    """Speedup samples of a pruned model over each runtime, one round per letter: ``f``/``s`` both
    blocks fast/slow, ``m`` ONNX Runtime's block fast and the plans' block slow. Fast: the model
    10 ms, the dense plan 16 ms, ONNX Runtime 18 ms on 2 threads; slow: 11.5, 19.2 and 23.4 ms;
    ONNX Runtime on 1 thread 33.3 ms in both."""
    plans = {"f": (10.0, 16.0), "s": (11.5, 19.2), "m": (11.5, 19.2)}
    ort = {"f": 18.0, "s": 23.4, "m": 18.0}
    out: dict[str, list[float]] = {ONNXRUNTIME: [], STATE_PROBE: [], DENSE_PLAN: [], TORCH: []}
    for c in states:
        p, d = plans[c]
        out[ONNXRUNTIME].append(ort[c] / p)
        out[STATE_PROBE].append(33.3 / p)
        out[DENSE_PLAN].append(d / p)
        out[TORCH].append(23.0 / p)
    return out


def test_speedups_by_state_split_rounds_where_both_blocks_agree_and_leave_out_the_mixed() -> None:
    by = _outcome(_rounds("fsffmsf")).speedups_by_state()
    assert by is not None and by["states"] == ["fast", "slow", "fast", "fast", "mixed", "slow", "fast"]
    assert (by["fast"]["rounds"], by["slow"]["rounds"], by["mixed"]["rounds"]) == (4, 2, 1)
    assert by["fast"]["gain"] == pytest.approx(33.3 / 18.0) and by["slow"]["gain"] == pytest.approx(33.3 / 23.4)
    assert by["fast"]["speedup_by_runtime"][ONNXRUNTIME] == pytest.approx(1.8)
    assert by["slow"]["speedup_by_runtime"][ONNXRUNTIME] == pytest.approx(23.4 / 11.5)
    assert by["slow"]["speedup_by_runtime"][DENSE_PLAN] == pytest.approx(19.2 / 11.5)
    assert STATE_PROBE not in by["fast"]["speedup_by_runtime"] and "speedup_by_runtime" not in by["mixed"]
    # the probe is no dense runtime to report a speedup over
    samples = _rounds("fsffmsf")
    assert STATE_PROBE not in _outcome(samples).speedups_by_runtime()
    assert set(_outcome(samples).to_json()["measured_speedup_by_runtime"]) == {ONNXRUNTIME, TORCH, DENSE_PLAN}


def test_when_only_onnx_runtimes_block_changed_state_no_round_is_labelled() -> None:
    # ONNX Runtime fast in three rounds, slow in three; the plans' block slow in all six
    by = _outcome(_rounds("msmsms")).speedups_by_state()
    assert by is not None and by["states"] == ["mixed"] * 6 and set(by) == {"gains", "states", "mixed"}


def test_the_cli_states_both_states_speedups_and_says_which_to_expect_deployed() -> None:
    from spdy.commands.search import _state_line

    assert _state_line(None, ONNXRUNTIME, 2) == ""
    by = {"gains": [1.85, 1.42, 1.85, 1.85, 1.6, 1.42, 1.85],
          "fast": {"rounds": 4, "gain": 1.85, "speedup_by_runtime": {ONNXRUNTIME: 1.80}},
          "slow": {"rounds": 2, "gain": 1.42, "speedup_by_runtime": {ONNXRUNTIME: 2.03}}, "mixed": {"rounds": 1}}
    line = _state_line(by, ONNXRUNTIME, 2)
    assert "in 2 of 7 rounds ONNX Runtime gained only 1.42x from 2 threads over 1 (1.85x in 4" in line
    assert "over ONNX Runtime 1.80x in the fast rounds, 2.03x in the slow ones; 1 round with the blocks" in line
    one = _state_line({"gains": [1.84] * 5, "all": {"rounds": 5, "gain": 1.84}}, ONNXRUNTIME, 2)
    assert one.startswith("ONNX Runtime gained 1.84x from 2 threads over 1") and "alike in all 5" in one
    few = _state_line({"gains": [1.84] * 3, "all": {"rounds": 3, "gain": 1.84}}, ONNXRUNTIME, 2)
    assert "3 rounds, too few to tell two states apart" in few
    mixed = _state_line({"gains": [1.4, 1.86, 1.41], "mixed": {"rounds": 3, "gain": 1.41}}, ONNXRUNTIME, 2)
    assert "gained 1.40-1.86x" in mixed and "mix the two states" in mixed

"""Speed as a distribution: per-round speedups pooled per model, a percentile held to the target."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from spdy.errors import InvalidInputError
from spdy.measure import FIT_BAND, MeasureConfig, Rounds, fit_to_measured, pooled
from spdy.results import Outcome
from spdy.types import Solution


def _outcome(speedup: float = 2.0, levels: tuple[int, int] = (1, 2)) -> Outcome:
    sol = Solution(("a", "b"), np.array(levels), np.array([0.5, 0.9]), 1.0 / speedup, speedup, 0.1)
    return Outcome("spdy", sol, 0.1)


def test_rounds_give_per_round_speedups_and_medians():
    r = Rounds(np.array([10.0, 20.0, 12.0]), {"m": np.array([5.0, 8.0, 6.0])}, np.array([1.0, 1.0, 1.0]))
    assert np.allclose(r.speedups("m"), [2.0, 2.5, 2.0])
    assert r.dense == 12.0 and r.time("m") == 6.0


def test_pooled_keeps_or_restarts_the_samples_and_takes_the_percentile():
    o = pooled(_outcome(), 0.5, [2.0, 2.2, 1.8], 1.0, 50.0, keep=False)
    assert o.speedup_samples == (2.0, 2.2, 1.8) and o.measured_speedup == pytest.approx(2.0)
    o2 = pooled(o, 0.6, [1.5, 1.6, 1.4], 1.0, 50.0, keep=True)  # the same model, timed again in a slow spell
    assert len(o2.speedup_samples) == 6 and o2.measured_speedup == pytest.approx(np.median([2.0, 2.2, 1.8, 1.5, 1.6, 1.4]))
    low = pooled(o, 0.6, [1.5, 1.6, 1.4], 1.0, 10.0, keep=True)
    assert low.measured_speedup == pytest.approx(np.percentile([2.0, 2.2, 1.8, 1.5, 1.6, 1.4], 10))
    fresh = pooled(o, 0.6, [1.5], 1.0, 50.0, keep=False)  # another model: its own samples only
    assert fresh.speedup_samples == (1.5,)


def test_summary_and_json_report_the_spread():
    o = pooled(_outcome(), 0.5, [1.0, 2.0, 3.0, 4.0, 5.0], 1.0, 50.0, keep=False)
    s = o.speedup_summary()
    assert s["rounds"] == 5 and s["median"] == 3.0 and s["p10"] == pytest.approx(1.4) and s["max"] == 5.0
    assert o.to_json()["measured_speedup_samples"] == s
    assert _outcome().speedup_summary() is None


def test_percentile_is_validated():
    assert MeasureConfig(percentile=10).percentile == 10
    for bad in (0, 100, -5, 150):
        with pytest.raises(InvalidInputError, match="percentile"):
            MeasureConfig(percentile=bad)


def test_the_fit_holds_the_asked_percentile_to_the_target():
    """A machine whose rounds swing between a fast and a slow state: the median meets 2x,
    the 10th percentile does not, so asking for p10 makes the fit tighten the model."""
    target = 2.0
    first = pooled(_outcome(2.0), 0.5, [2.3, 2.0, 1.7], 1.0, 10.0, keep=False)
    assert first.measured_speedup < FIT_BAND[0] * target
    tighter = _outcome(2.4, levels=(2, 3))

    def resolve(name: str, t: float) -> Outcome:
        return dataclasses.replace(tighter, method=name)

    def measure(sols):
        out = {}
        for key, sol in sols.items():
            base = sol.predicted_speedup
            samples = np.array([base * 1.15, base, base * 0.85])
            out[key] = (1.0 / base, float(np.median(samples)), 1.0, samples)
        return out

    got, dpt, log = fit_to_measured(target, {"spdy": first}, {"spdy": target}, resolve, measure, 5.0, rounds=1,
                                    percentile=10.0)
    assert log and log[0]["accepted"]
    o = got["spdy"]
    assert o.solution.predicted_speedup == pytest.approx(2.4)
    assert len(o.speedup_samples) == 3  # a new model starts its own pool
    assert o.measured_speedup == pytest.approx(np.percentile([2.4 * 1.15, 2.4, 2.4 * 0.85], 10))

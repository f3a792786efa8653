"""The reference a target is over: chosen from side-by-side rounds, and applied to the DP's target."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from spdy.errors import InfeasibleBudgetError, InvalidInputError, ReferenceUnavailableError
from spdy.grid import spdy_grid
from spdy.measure import MeasureConfig, check_latency, dp_target_for, largest_target, lowest_dp_target, unreachable
from spdy.profilers.dense_runtimes import DENSE_PLAN, DenseRuntimes
from spdy.reference import MIN_DP_TARGET, Reference, check_available, check_reference
from spdy.sensitivity import make_storage
from spdy.types import LatencyTable


def _ref(ratio: float, runtime: str = "onnxruntime", asked: str = "fastest") -> Reference:
    return Reference(asked, runtime, ratio, ratios={runtime: ratio})


def test_fastest_is_the_faster_runtime_by_its_per_round_ratio_to_the_dense_plan():
    plan = [10.0, 20.0, 10.0]  # a slow spell in round 2 slows everything alike
    runtimes = {"torch": [11.0, 22.0, 11.0], "onnxruntime": [8.0, 16.0, 9.0]}
    ref = Reference.from_rounds("fastest", plan, runtimes, {})
    assert ref.runtime == "onnxruntime" and ref.label == "ONNX Runtime"
    assert ref.ratio == pytest.approx(0.8)  # the median of 0.8, 0.8, 0.9
    assert ref.ratios == pytest.approx({"torch": 1.1, "onnxruntime": 0.8})
    assert ref.dense_s == pytest.approx({DENSE_PLAN: 10.0, "torch": 11.0, "onnxruntime": 9.0})
    torch_ref = Reference.from_rounds("torch", plan, runtimes, {})
    assert torch_ref.runtime == "torch" and torch_ref.ratio == pytest.approx(1.1)
    assert Reference.from_json(ref.to_json()) == ref


def test_without_onnxruntime_fastest_falls_back_to_torch_and_says_so():
    why = {"onnxruntime": "exporting model 'm' to ONNX failed: aten::erfinv"}
    ref = Reference.from_rounds("fastest", [10.0], {"torch": [12.0]}, why)
    assert ref.runtime == "torch" and ref.ratio == pytest.approx(1.2)
    (warning,) = ref.warnings()
    assert "ONNX Runtime cannot run this model" in warning and "erfinv" in warning and "over torch eager" in warning
    with pytest.raises(ReferenceUnavailableError, match="--reference onnxruntime"):
        Reference.from_rounds("onnxruntime", [10.0], {"torch": [12.0]}, why)
    with pytest.raises(ReferenceUnavailableError, match="erfinv.*--reference torch"):
        check_available("onnxruntime", DenseRuntimes({}, why))
    check_available("fastest", DenseRuntimes({}, why))  # falls back, no error
    with pytest.raises(InvalidInputError, match="fastest, torch, torch_channels_last, torch_compile, onnxruntime"):
        check_reference("tensorrt")


def test_the_reference_ratio_converts_the_target_into_the_dps_terms():
    # ONNX Runtime runs the dense model in 0.8x the dense plan's time: 2x over it is 2.5x over the plan
    assert dp_target_for(2.0, 1.0, _ref(0.8)) == pytest.approx(2.5)
    assert dp_target_for(2.0, 1.1, _ref(0.8)) == pytest.approx(2.75)  # and the latency correction on top
    assert dp_target_for(2.0, 0.95, _ref(0.8)) == pytest.approx(1.9 / 0.8)
    assert dp_target_for(2.0, 0.6, _ref(0.8)) == pytest.approx(lowest_dp_target(2.0) / 0.8)  # the floor, converted
    assert dp_target_for(1.1, 1.0, _ref(1.25, "torch")) == MIN_DP_TARGET  # the dense plan alone beats torch by more
    assert dp_target_for(2.0, 1.1, Reference.unmeasured("fastest")) == pytest.approx(2.2)
    # the largest target whose DP target a profile reaching 3x over the dense plan still meets
    for q in (1.2, 1.0, 0.95):
        top = largest_target(3.0, q, _ref(0.8))
        assert dp_target_for(top, q, _ref(0.8)) == pytest.approx(3.0)


def _table() -> LatencyTable:
    grid = spdy_grid(42)
    times = np.linspace(1.0, 3.0, 6)[:, None] * (0.05 + 0.95 * (1 - grid.as_array()))[None, :] * 1e-3
    return LatencyTable([f"l{i}" for i in range(6)], grid, times, 0.1 * float(times[:, 0].sum()))


def _stored(tmp_path, correction: dict) -> str:
    journal = str(tmp_path / "s.journal")
    optuna.create_study(study_name="s", storage=make_storage(journal)).set_user_attr("latency_correction", correction)
    return journal


def _check(journal: str, target: float, asked: str = "fastest") -> float:
    """The DP target of a resumed search whose study stored a correction (the reference asked for
    now: ``asked``, an early estimate of its ratio that the stored one must override)."""
    _, dp_target = check_latency(SimpleNamespace(table=_table()), target, 1000, MeasureConfig(), storage=journal,
                                 study_name="s", resume=True, progress=None, reference=Reference(asked, "torch", 1.0))
    return dp_target


def test_check_latency_applies_the_stored_reference_ratio_and_names_the_largest_target_over_it(tmp_path):
    table = _table()
    ref = _ref(0.8)
    journal = _stored(tmp_path, {"factor": 1.1, "reference": ref.to_json()})
    assert _check(journal, 2.0) == pytest.approx(2.0 * 1.1 / 0.8)
    top = largest_target(table.max_speedup(), 1.1, ref)
    assert top == pytest.approx(table.max_speedup() * 0.8 / 1.1)
    with pytest.raises(InfeasibleBudgetError, match=r"over ONNX Runtime is out of reach.*0\.80x the dense plan's time"
                       r".*1\.10x slower") as info:
        _check(journal, 1.05 * top)
    assert info.value.max_speedup == pytest.approx(top)
    assert f"Ask for at most {top:.2f}x" in str(info.value)


def test_a_study_calibrated_against_another_reference_is_not_resumed(tmp_path):
    journal = _stored(tmp_path, {"factor": 1.0, "reference": _ref(0.8).to_json()})
    with pytest.raises(InvalidInputError, match="--reference fastest; pass --reference fastest"):
        _check(journal, 1.5, asked="torch")
    (tmp_path / "old").mkdir()
    old = _stored(tmp_path / "old", {"factor": 1.0})  # a study from before speedups were over a reference
    with pytest.raises(InvalidInputError, match="over the dense plan, not over a dense reference runtime"):
        _check(old, 1.5)


def test_a_target_the_dense_plan_meets_alone_is_told_apart_from_one_out_of_reach():
    ref = _ref(1.4, runtime="torch", asked="torch")  # torch eager takes 1.4x the dense plan's time
    free = unreachable(ref, 1.1, 1.0)  # no pruned model beats the dense plan
    assert "1.1x over torch eager needs no pruning" in str(free) and "1.40x faster than torch eager" in str(free)
    assert f"runs {MIN_DP_TARGET:g}x faster than the dense plan" in str(free) and free.max_speedup == pytest.approx(1.4)
    far = unreachable(ref, 2.0, 1.2)
    assert "2x over torch eager is out of reach" in str(far) and "Ask for at most 1.68x" in str(far)
    assert far.max_speedup == pytest.approx(1.68)

"""Speed as a distribution: per-round speedups pooled per model, a percentile held to the target."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from spdy.errors import InvalidInputError
from spdy.measure import (FIT_BAND, MeasureConfig, Rounds, faster_reference, faster_runtime_warning, fit_to_measured,
                          over_runtime, pooled)
from spdy.reference import Reference
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


def test_a_runtime_faster_than_the_fastest_reference_is_reported():
    # the latency check found torch.compile fastest; the rounds after the search found ONNX Runtime faster
    ref = Reference("fastest", "torch_compile", 1.06, ratios={"torch_compile": 1.06, "onnxruntime": 1.09})
    by_rt = {"torch_compile": [1.36, 1.52, 1.73], "onnxruntime": [1.10, 1.22, 1.65], "dense_plan": [1.35, 1.38, 1.48]}
    o = pooled(_outcome(), 0.018, [1.36, 1.52, 1.73], 0.025, 50.0, keep=False, by_runtime=by_rt)
    msg = faster_runtime_warning(1.5, o, ref)
    assert msg is not None
    assert "ONNX Runtime ran the dense model faster than torch.compile" in msg
    assert "1.22x over ONNX Runtime" in msg and "1.52x over torch.compile" in msg
    assert "below 95% of the 1.5x target" in msg and "--reference onnxruntime" in msg
    # within the margin, or a reference the user named, or nothing else measured: silent
    close = {**by_rt, "onnxruntime": [1.40, 1.47, 1.60]}
    assert faster_runtime_warning(1.5, pooled(o, 0.018, [1.36, 1.52, 1.73], 0.025, 50.0, keep=False, by_runtime=close),
                                  ref) is None
    assert faster_runtime_warning(1.5, o, dataclasses.replace(ref, asked="torch_compile")) is None
    alone = pooled(_outcome(), 0.018, [1.5], 0.025, 50.0, keep=False, by_runtime={"torch_compile": [1.5]})
    assert faster_runtime_warning(1.5, alone, ref) is None
    # a lower speedup that still meets the target is reported without the shortfall
    assert "below" not in faster_runtime_warning(1.1, o, ref)


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


def test_measured_models_run_in_the_inference_form():
    """measure_rounds times the model with its BatchNorms folded, as the profile did: dense layers
    with the folded weight and bias, pruned ones with the database's zeros, scaled as the fold scales."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from spdy.grid import SparsityGrid
    from spdy.measure import measure_rounds
    from spdy.models.base import ModelBundle, batchnorm_modules
    from spdy.types import LatencyTable

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
    bundle = ModelBundle("cnn", model.eval(), [torch.randn(2, 3, 6, 6)])
    table = LatencyTable(("0", "4"), SparsityGrid((0.0, 0.5)), np.full((2, 2), 1e-3), 1e-3)

    class HalfPruned:  # a database: every weight with its smaller half zeroed
        def weight(self, name, choice):
            w = model.get_submodule(name).weight.detach().numpy()
            return np.where(np.abs(w) > np.median(np.abs(w)), w, 0.0).astype(np.float32)

    class Recorder:
        def time_models(self, b, plans, extra=(), blocks=False):  # extra: the dense runtimes timed in the same pool (none here)
            self.bundle, self.plans, self.blocks = b, plans, blocks
            return [SimpleNamespace(median_s=1.0) for _ in (*plans, *extra)]

    rec = Recorder()
    measure_rounds(SimpleNamespace(table=table), bundle, rec, HalfPruned(), {"p": table.solution(np.array([1, 1]))})
    assert rec.bundle is bundle.inference and not batchnorm_modules(rec.bundle.model)
    assert rec.blocks  # each model in a loop of its own, as deployed, not call by call among the others
    folded = bundle.inference.model[0]
    dense, pruned = rec.plans[0]["0"], rec.plans[1]["0"]
    np.testing.assert_allclose(dense.weight, folded.weight.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(dense.bias, folded.bias.detach().numpy(), rtol=1e-6)
    db_w = HalfPruned().weight("0", None)
    assert ((pruned.weight == 0) == (db_w == 0)).all() and (db_w == 0).mean() == 0.5
    scale = (folded.weight.detach().numpy() / model[0].weight.detach().numpy())[:, :1, :1, :1]
    np.testing.assert_allclose(pruned.weight, db_w * scale, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pruned.bias, folded.bias.detach().numpy(), rtol=1e-6)


def test_matched_baselines_record_spdy_in_the_same_rounds():
    """SPDY's answer was timed earlier in a slow spell; the baseline, solved for its DP target,
    is timed side by side with it later: the record keeps SPDY's speed in those rounds alone."""
    from spdy.measure import _match_baselines

    best = pooled(_outcome(2.0), 0.5, [1.2, 1.2, 1.2], 1.0, 50.0, keep=False)
    baseline = dataclasses.replace(_outcome(1.9), method="uniform")

    def measure(sols):
        speed = {"__best__": 1.6, "uniform": 1.7}
        return {k: (1.0 / speed[k], speed[k], 1.0, np.full(3, speed[k])) for k in sols}

    out, best2, records = _match_baselines(best, 2.2, 2.0, {"uniform": baseline},
                                           lambda n, t: dataclasses.replace(_outcome(t), method=n), measure, 50.0)
    (rec,) = records
    assert rec["matched"] and rec["measured"] == pytest.approx(1.7)
    assert rec["spdy_measured_same_rounds"] == pytest.approx(1.6)
    assert best2.measured_speedup == pytest.approx(1.4)  # the pool still holds the slow spell


def test_a_baseline_short_of_spdys_final_target_is_matched_at_the_most_it_reaches():
    """SPDY's fit raised its DP target past what uniform reaches (2.618 vs 2.613 in a MiniLM run):
    uniform is solved for its own most, not left at the old target, and the record says so."""
    from spdy.errors import InfeasibleBudgetError
    from spdy.measure import _match_baselines

    best = pooled(_outcome(2.6), 0.5, [1.9, 1.9, 1.9], 1.0, 50.0, keep=False)
    old = dataclasses.replace(_outcome(1.9), method="uniform")
    asked: list[float] = []

    def resolve(n, t):
        asked.append(t)
        if t > 2.5:
            raise InfeasibleBudgetError("out of reach", max_speedup=2.5)
        return dataclasses.replace(_outcome(t), method=n)

    def measure(sols):
        return {k: (0.5, 2.0, 1.0, np.full(3, 2.0)) for k in sols}

    out, _, (rec,) = _match_baselines(best, 2.6, 1.9, {"uniform": old}, resolve, measure, 50.0)
    assert asked[0] == 2.6 and asked[1] == pytest.approx(2.5)
    assert rec["dp_target"] == pytest.approx(2.5) and rec["spdy_dp_target"] == 2.6
    assert "short of SPDY's final DP target" in rec["why"]
    # a baseline whose most is no nearer than its old target keeps it
    out, _, records = _match_baselines(best, 2.6, 2.55, {"uniform": old}, resolve, measure, 50.0)
    assert records == [] and out["uniform"] is old


def _switch_case():
    """The latency check found torch.compile fastest; the rounds after the search found ONNX Runtime faster."""
    ref = Reference("fastest", "torch_compile", 1.28, ratios={"torch_compile": 1.28, "onnxruntime": 1.34})
    by_rt = {"torch_compile": [1.48, 1.49, 1.54], "onnxruntime": [1.30, 1.32, 1.33], "dense_plan": [1.10, 1.10, 1.11]}
    return ref, pooled(_outcome(), 0.015, by_rt["torch_compile"], 0.017, 50.0, keep=False, by_runtime=by_rt)


def test_the_faster_runtime_becomes_the_reference_with_its_ratio_from_the_rounds():
    ref, o = _switch_case()
    new = faster_reference(o, ref)
    assert new is not None and new.runtime == "onnxruntime" and new.asked == "fastest"
    # ONNX Runtime's time over the dense plan's, round by round: speedup over it / speedup over the plan
    assert new.ratio == pytest.approx(np.median([1.30 / 1.10, 1.32 / 1.10, 1.33 / 1.11]))
    assert new.ratios["onnxruntime"] == new.ratio and new.label == "ONNX Runtime"
    moved = over_runtime(o, "onnxruntime", 50.0)
    assert moved.speedup_samples == (1.30, 1.32, 1.33) and moved.measured_speedup == pytest.approx(1.32)
    assert over_runtime(o, "torch", 50.0) is o  # not measured: unchanged
    # within the margin, a reference the user named, or nothing else measured: it stands
    assert faster_reference(o, dataclasses.replace(ref, asked="torch_compile")) is None
    close = dict(o.runtime_samples, onnxruntime=(1.45, 1.47, 1.50))
    assert faster_reference(pooled(o, 0.015, [1.48, 1.49, 1.54], 0.017, 50.0, keep=False, by_runtime=close), ref) is None
    alone = pooled(_outcome(), 0.015, [1.5], 0.017, 50.0, keep=False, by_runtime={"torch_compile": [1.5]})
    assert faster_reference(alone, ref) is None


def test_measure_and_fit_holds_the_target_to_the_faster_runtime_and_fits_again(monkeypatch):
    """The glue: after the first fit, a faster runtime found in the rounds becomes the reference,
    SPDY's answer and the baselines are read over it, and the fit runs again from the DP target the
    first one ended at; the result carries the new reference and says why."""
    import types

    import spdy.measure as m

    ref, first = _switch_case()
    rounds = Rounds(np.array([0.017] * 3), {"__best__": np.array([0.0115] * 3)}, np.array([0.003] * 3),
                    {"torch_compile": np.array([0.0172] * 3), "onnxruntime": np.array([0.0152] * 3)}, "torch_compile")
    monkeypatch.setattr(m, "measure_rounds", lambda *a, **k: rounds)
    calls = []
    final = dataclasses.replace(over_runtime(first, "onnxruntime", 50.0), measured_speedup=1.51)

    def fake_fit(prepared, objective, target, best, base_out, dp_target, settings, refine, only, threads, runtimes,
                 reference):
        calls.append((reference.runtime, dp_target, best.measured_speedup))
        if len(calls) == 1:
            return first, base_out, [{"method": "spdy", "round": 1}], 1.22
        return final, base_out, [{"method": "spdy", "round": 1}], 1.31

    monkeypatch.setattr(m, "_fit", fake_fit)
    prepared = types.SimpleNamespace(profile=None, table=types.SimpleNamespace(base_s=0.003), bundle=None,
                                     backend=None, database=None)
    got = m.measure_and_fit(prepared, None, 1.5, 1.17, _outcome(), {}, MeasureConfig(), searcher=None,
                            only_baseline=None, eval_threads=None, progress=None, reference=ref, runtimes=None)
    assert calls[0][:2] == ("torch_compile", 1.17)
    # the second fit: over ONNX Runtime, from the first fit's final DP target, SPDY's answer read over it
    assert calls[1] == ("onnxruntime", 1.22, pytest.approx(1.32))
    assert got.reference.runtime == "onnxruntime" and got.best.measured_speedup == 1.51
    assert any("the target is held to ONNX Runtime" in w for w in got.warnings)
    assert got.fit[-1]["reference"] == "onnxruntime" and "reference" not in got.fit[0]

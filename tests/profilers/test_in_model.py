"""In-model terms: shape groups, spanning random models and the fit of ``alpha * t + beta``."""

from __future__ import annotations

import numpy as np
import pytest

from spdy.errors import InvalidInputError
from spdy.profilers.in_model import (
    ALPHA_BOUNDS,
    InModelTerms,
    fit_terms,
    group_key,
    layer_groups,
    model_features,
    spanning_level_vectors,
)
from spdy.types import LayerSpec


def _lin(name: str, out_f: int, in_f: int, bias: bool = True) -> LayerSpec:
    return LayerSpec(name, "linear", (out_f, in_f), (1, 128, in_f), bias)


def test_layers_of_one_shape_share_a_group_and_others_do_not():
    specs = [_lin("q", 384, 384), _lin("k", 384, 384), _lin("up", 1536, 384), _lin("down", 384, 1536),
             _lin("q_nobias", 384, 384, bias=False), _lin("q2", 384, 384)]
    keys, index = layer_groups(specs)
    assert len(keys) == 4
    assert index[0] == index[1] == index[5]
    assert len({index[0], index[2], index[3], index[4]}) == 4
    conv_a = LayerSpec("c1", "conv2d", (16, 16, 3, 3), (1, 16, 8, 8), True, stride=(1, 1))
    conv_b = LayerSpec("c2", "conv2d", (16, 16, 3, 3), (1, 16, 8, 8), True, stride=(2, 2))
    assert group_key(conv_a) != group_key(conv_b)


def test_spanning_vectors_cover_the_grid_and_are_seeded():
    v = spanning_level_vectors(36, 42, 200, seed=3)
    assert v.shape == (200, 36) and v.min() >= 0 and v.max() <= 41
    assert np.array_equal(v, spanning_level_vectors(36, 42, 200, seed=3))
    means = v.mean(axis=1)
    # some models mostly mildly pruned, some mostly at the top of the grid, some with dense layers kept
    assert means.min() < 12 and means.max() > 32
    assert (v == 0).any(axis=1).mean() > 0.3
    with pytest.raises(InvalidInputError):
        spanning_level_vectors(3, 1, 2)


def _simulate(alpha: float, beta: float, n_models: int, rng: np.random.Generator):
    """Models of 12 layers: loop times, which layers run sparse kernels, and the end-to-end
    ratio to the unpruned model that a runtime with these true terms would measure."""
    base = 2e-3
    ref_t = np.full(12, 3e-4)
    ref_sparse = np.zeros(12, dtype=bool)
    ref_sparse[:4] = True  # some unpruned layers run a sparse format (faster on dense weights)
    feats, ratios = [], []
    for _ in range(n_models):
        t = rng.uniform(2e-5, 3e-4, 12)
        sparse = rng.random(12) < 0.8
        f = model_features(t, sparse)
        true_t = base + f[0] + alpha * f[1] + beta * f[2]
        true_ref = base + ref_t[~ref_sparse].sum() + alpha * ref_t[ref_sparse].sum() + beta * ref_sparse.sum()
        feats.append(f)
        ratios.append(true_t / true_ref)
    return np.array(feats), model_features(ref_t, ref_sparse), base, np.array(ratios)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.85, 1.2e-4), (1.3, -1e-5)])
def test_fit_recovers_the_terms_that_generated_the_measurements(alpha, beta):
    F, ref, base, ratio = _simulate(alpha, beta, 24, np.random.default_rng(0))
    terms = fit_terms(F, ref, base, ratio)
    assert terms.alpha == pytest.approx(alpha, abs=1e-3)
    assert terms.beta == pytest.approx(beta, abs=2e-7)
    assert terms.fit["error_after"]["median_abs"] < 1e-4


def test_one_disturbed_measurement_does_not_move_the_fit():
    F, ref, base, ratio = _simulate(0.9, 8e-5, 24, np.random.default_rng(1))
    ratio[5] *= 1.6  # one model timed while the machine was busy
    terms = fit_terms(F, ref, base, ratio)
    assert terms.alpha == pytest.approx(0.9, abs=0.03)
    assert terms.beta == pytest.approx(8e-5, abs=1e-5)


def _simulate_rest(call: float, gamma: float, delta: float, n_models: int, rng: np.random.Generator,
                   noise: float = 0.0):
    """Models of 12 layers whose rest of the pass grows per call, per kept weight and per serial
    kernel (the truth), measured as ratios to the unpruned model, plus the anchor: the unpruned
    model's absolute time."""
    base, numel = 2e-3, np.full(12, 0.15)  # 0.15 M weights per layer
    truth = np.array([1.0, 1.0, 0.0, call, gamma, delta])

    def model(t, sparse, sparsity, serial):
        return model_features(t, sparse, (1 - sparsity) * numel, serial)

    ref = model(np.full(12, 3e-4), np.zeros(12, bool), np.zeros(12), np.zeros(12, bool))
    t_ref = base + ref @ truth
    feats, ratios = [], []
    for _ in range(n_models):
        s = rng.uniform(0.5, 0.99, 12) * (rng.random(12) < 0.8)
        sparse = s > 0
        t = np.where(sparse, 3e-4 * (1 - s) * rng.uniform(0.6, 1.6, 12), 3e-4)  # kernels' own speed varies
        f = model(t, sparse, s, sparse & (rng.random(12) < 0.5))
        feats.append(f)
        ratios.append((base + f @ truth) / t_ref * (1 + rng.normal(0, noise)))
    return np.array(feats), ref, base, np.array(ratios), [(ref, t_ref)]


def test_fit_learns_the_rest_of_the_pass_and_prefers_that_form():
    F, ref, base, ratio, anchor = _simulate_rest(4e-5, 1.5e-3, 3e-5, 24, np.random.default_rng(5))
    terms = fit_terms(F, ref, base, ratio, anchor)
    assert terms.fit["fitted"] and terms.fit["form"] in ("rest", "both")
    assert terms.fit["error_after"]["median_abs"] < 1e-3
    assert terms.alpha == pytest.approx(1.0, abs=0.02) and abs(terms.beta) < 2e-6
    assert terms.call == pytest.approx(4e-5, rel=0.05)
    assert terms.gamma == pytest.approx(1.5e-3, rel=0.05)
    assert terms.delta == pytest.approx(3e-5, rel=0.05)
    assert abs(terms.fit["anchor_error"]["after"][0]) < 1e-3 < abs(terms.fit["anchor_error"]["before"][0])
    # the table's unpruned layer (0.15 M weights, dense format) now carries its share of the rest
    assert terms.apply(3e-4, sparse=False, kept_mweights=0.15) == pytest.approx(3e-4 + 4e-5 + 1.5e-3 * 0.15, rel=0.05)
    assert set(terms.fit["held_out_by_form"]) == {"sparse-call", "rest", "both"}
    assert InModelTerms.from_json(terms.to_json()) == terms


def test_the_anchor_alone_cannot_make_a_noisy_fit_stick():
    # the rest is real, but the ratios are too noisy for any form to predict held-out models better
    F, ref, base, ratio, anchor = _simulate_rest(0.0, 5e-5, 0.0, 24, np.random.default_rng(6), noise=0.08)
    terms = fit_terms(F, ref, base, ratio, anchor)
    if not terms.fit["fitted"]:
        assert (terms.alpha, terms.beta, terms.call, terms.gamma, terms.delta) == (1.0, 0.0, 0.0, 0.0, 0.0)
    else:  # kept only because it predicted the held-out half better
        assert terms.fit["error_held_out"]["median_abs"] < terms.fit["error_before"]["median_abs"]


def test_terms_apply_round_trip_and_validate():
    t = InModelTerms(0.9, 5e-5, {"fitted": True})
    assert t.apply(1e-4) == pytest.approx(1.4e-4)
    assert InModelTerms(1.0, -1e-3).apply(1e-4) == pytest.approx(ALPHA_BOUNDS[0] * 1e-4)  # a short call is never free
    assert InModelTerms.from_json(t.to_json()) == t
    assert InModelTerms.from_json({"alpha": 0.9, "beta_s": 5e-5}) == InModelTerms(0.9, 5e-5, {})  # older profiles
    assert InModelTerms(1.0, 0.0, call=1e-5, gamma=2e-3, delta=3e-5).apply(1e-4, False, 0.5, True) == pytest.approx(
        1e-4 + 1e-5 + 1e-3 + 3e-5)
    with pytest.raises(InvalidInputError):
        InModelTerms(0.0, 0.0)
    with pytest.raises(InvalidInputError):
        InModelTerms(1.0, float("nan"))


def test_profile_shares_shapes_records_groups_and_terms():
    import torch
    from torch import nn

    from spdy.models.base import ModelBundle
    from spdy.profilers import get_backend, profile_model, validate

    from spdy.grid import SparsityGrid
    from spdy.testing.backends import TEST_POLICY

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 384), nn.ReLU(), nn.Linear(384, 384), nn.ReLU(), nn.Linear(384, 16)).eval()
    bundle = ModelBundle(name="three-linears", model=model, calibration=[torch.randn(64, 384)])
    be = get_backend("spdy-cpu", threads=1, policy=TEST_POLICY)
    prof = profile_model(bundle, be, SparsityGrid((0.0, 0.9, 0.99)), fit_models=6)
    assert any(f != "dense" for row in prof.formats for f in row), "a sparse kernel should win at 99%"
    t = prof.table.times
    # one shape group: one measurement (the in-model terms charge each layer's own stored weights,
    # which differ a little between two pruned weights in a blocked format)
    assert prof.formats[0] == prof.formats[1] and np.allclose(t[0], t[1], rtol=0.02)
    groups = prof.settings["measurement"]["groups"]
    assert len(groups) == 2 and sorted(g["layers"] for g in groups.values()) == [1, 2]
    terms = prof.settings["in_model"]
    # fitted on the 6 models; used only if they predicted the held-out half better (a tiny model: either)
    assert terms["fit"]["models"] == 6 and terms["alpha"] > 0 and "error_held_out" in terms["fit"]
    assert terms["fit"]["fitted"] or (terms["alpha"], terms["beta_s"]) == (1.0, 0.0)
    # the unpruned model and uniform ones near 70% and 95% timed with the base: one equation each
    assert [a["sparsity"] for a in prof.settings["anchor_models"]] == [0.0, 0.9, 0.99]
    assert prof.settings["anchor_models"][0]["measured_s"] == prof.settings["dense_measured_s"]
    assert len(terms["fit"]["anchor_error"]["before"]) == 3 and len(terms["fit"]["data"]["anchors"]) == 3
    probes = terms["fit"]["probes"]  # some fit models as timed, for validate to time again
    assert len(probes["levels"]) == len(probes["formats"]) == len(probes["ratios"]) == 4
    assert len(probes["reference_formats"]) == 3 and all(len(f) == 3 for f in probes["formats"])
    records = validate(prof, bundle, be, k=3, seed=0)
    for r in records:
        # the error is the speedup's: predicted over measured time, each over the dense model's
        assert r["error"] == pytest.approx(r["measured_speedup"] / r["predicted_speedup"] - 1)
        assert r["dense_measured_s"] > 0
        # the probes' shift is one number per round, and the same-state error takes it out
        assert 0.2 < r["state_shift"] < 5 and r["state_shift"] == records[0]["state_shift"]
        assert r["error_same_state"] == pytest.approx((1 + r["error"]) * r["state_shift"] - 1)
        assert r["state_shift"] == pytest.approx(float(np.median(r["probe_shifts"])))
        assert len(r["probe_shifts"]) == len(r["probe_ratios"]) >= 1
        # the state read in the round: one line for the round, the table's prediction put on it
        assert r["state_scale"] == records[0]["state_scale"] and r["state_offset_s"] == records[0]["state_offset_s"]
        assert r["predicted_state_s"] == pytest.approx(r["state_scale"] * r["predicted_s"] + r["state_offset_s"])
        assert r["error_state"] == pytest.approx(r["predicted_state_s"] / r["measured_s"] - 1)


def test_terms_that_do_not_predict_held_out_models_are_not_used():
    # loop times already right (alpha 1, beta 0), the measurements only noise: a fit can only chase it
    F, ref, base, ratio = _simulate(1.0, 0.0, 24, np.random.default_rng(2))
    noisy = ratio * (1 + np.random.default_rng(3).normal(0, 0.03, len(ratio)))
    terms = fit_terms(F, ref, base, noisy)
    assert not terms.fit["fitted"] and "held-out" in terms.fit["why"]
    assert (terms.alpha, terms.beta) == (1.0, 0.0)
    assert terms.fit["error_held_out"]["median_abs"] >= terms.fit["error_before"]["median_abs"]


def test_beta_is_bounded_below():
    F, ref, base, ratio = _simulate(1.0, -5e-4, 24, np.random.default_rng(4))  # a physically absurd truth
    terms = fit_terms(F, ref, base, ratio)
    assert terms.beta >= -20e-6 - 1e-12


def test_the_rest_form_leaves_loop_times_when_a_real_profile_asks_it_to():
    """On a real 2-thread MiniLM profile's fit data the unpruned model ran 11% over base plus its
    layers; a solver started at the identity (gamma on its bound) stayed there. The fit must reach
    the anchor and fit the random models no worse than loop times do."""
    import json
    from pathlib import Path

    from spdy.profilers import in_model

    d = json.loads((Path(__file__).parent / "data" / "minilm_t2_fit.json").read_text())
    F, ref, ratio = np.array(d["features"]), np.array(d["reference"]), np.array(d["ratios"])
    anchor = (np.array(d["anchor"][0]), d["anchor"][1])
    p = in_model._least_squares(F, ref, d["base_s"], ratio, [anchor], in_model.FORMS["rest"])
    c = in_model._coefficients(p)
    assert (d["base_s"] + anchor[0] @ c) / anchor[1] - 1 == pytest.approx(0.0, abs=0.01)  # loop times: -11%
    assert p["call"] > 0 and p["gamma"] > 0
    loop = in_model._errors(F, ref, d["base_s"], ratio, in_model._identity())
    fitted = in_model._errors(F, ref, d["base_s"], ratio, p)
    assert np.median(np.abs(fitted)) <= np.median(np.abs(loop)) + 0.005


def test_probes_span_the_fit_from_the_sparsest_to_the_densest() -> None:
    from spdy.profilers.profiler import probe_shifts, spanning_probes, state_shift

    ratios = np.array([0.6, 0.3, 0.9, 0.45, 0.75, 0.5, 0.35])
    pick = spanning_probes(ratios, 4)
    assert ratios[pick].tolist() == [0.3, 0.45, 0.6, 0.9]  # the sparsest and the densest included
    assert spanning_probes(ratios[:3], 4).tolist() == [1, 0, 2]
    then = np.array([0.3, 0.6, 0.9])
    probe_s = [2.0, 0.51, 1.2, 1.8]  # the reference 2 s; the probes' ratios now 0.255, 0.6, 0.9
    np.testing.assert_allclose(probe_shifts(probe_s, then), [0.85, 1.0, 1.0])
    assert state_shift(probe_s, then) == pytest.approx(1.0)



def test_the_state_is_read_off_a_line_through_the_dense_model_and_random_ones() -> None:
    from spdy.grid import SparsityGrid
    from spdy.profilers.profiler import FIT_SEED_OFFSET, STATE_ANCHORS, read_state, state_anchor_vectors
    from spdy.types import LatencyTable

    grid = SparsityGrid((0.0, 0.5, 0.8, 0.9, 0.95))
    times = np.array([[4.0, 2.2, 1.2, 0.8, 0.5], [2.0, 1.1, 0.6, 0.4, 0.3]]) * 1e-3
    table = LatencyTable(["a", "b"], grid, times, 1e-3)
    anchors = state_anchor_vectors(table, seed=3)
    assert anchors.shape == (STATE_ANCHORS, 2) and ((anchors >= 0) & (anchors <= 4)).all()
    # drawn apart from the validated models of that seed and from the fit's
    for other in (spanning_level_vectors(2, 5, STATE_ANCHORS, 3), spanning_level_vectors(2, 5, STATE_ANCHORS, 3 + FIT_SEED_OFFSET)):
        assert not np.array_equal(anchors, other)
    # exact on a line; least squares (numpy's polynomial fit as the reference) through three noisy points
    assert read_state([7e-3, 2.8e-3], [6.3e-3, 2.0e-3]) == pytest.approx((43 / 42, 6.3e-3 - 7e-3 * 43 / 42))
    x, y = [7e-3, 2.8e-3, 1.8e-3], [6.5e-3, 2.3e-3, 1.5e-3]
    assert read_state(x, y) == pytest.approx(tuple(np.polyfit(x, y, 1)))
    with pytest.raises(InvalidInputError, match="two models of different predicted times"):
        read_state([1e-3, 1e-3], [1e-3, 2e-3])

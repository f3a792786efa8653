"""Backend conformance: written once, run against every available backend (unavailable ones skip)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import GRID3

from spdy.errors import InvalidInputError, ProfileMismatchError
from spdy.profile import load_profile, save_profile
from spdy.profilers import DENSE, STANDIN, LayerChoice, as_numpy, profile_model, validate
from spdy.profilers.pruning import LevelPruner


def _tol(backend) -> float:
    return 2e-2 if getattr(backend, "dtype_name", "float32") in ("float16", "bfloat16") else 1e-4


def _reference(spec, w, b, x):
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    bt = None if b is None else torch.from_numpy(b)
    if spec.kind == "linear":
        return torch.nn.functional.linear(xt, wt, bt).numpy()
    return torch.nn.functional.conv2d(xt, wt, bt, spec.stride, spec.padding, spec.dilation).numpy()


def _weights(bundle, name):
    m = bundle.model.get_submodule(name)
    return m.weight.detach().numpy().copy(), None if m.bias is None else m.bias.detach().numpy().copy()


def test_fingerprint_names_the_machine_and_runtime(backend):
    fp = backend.fingerprint()
    for key in ("cpu_model", "logical_cores", "threads", "versions", "backend"):
        assert key in fp, key
    assert fp["threads"] == backend.threads == 1
    assert fp["backend"] == backend.name
    json.dumps(fp)  # serialisable as it goes into the profile
    assert backend.fingerprint() == fp  # stable


def test_settings_record_threads_and_timing_policy(backend):
    st = backend.settings()
    assert st["threads"] == 1
    assert st["timing"]["min_repeats"] == backend.policy.min_repeats
    json.dumps(st)


@pytest.mark.parametrize("model", ["tiny_mlp", "tiny_conv"])
def test_every_format_computes_the_pruned_layer(backend, model, request):
    bundle = request.getfixturevalue(model)
    rng = np.random.default_rng(0)
    for spec in bundle.layers():
        w, b = _weights(bundle, spec.name)
        x = rng.standard_normal(spec.input_shape).astype(np.float32)
        pruner = LevelPruner(w)
        for s in GRID3.levels:
            fmts = backend.layer_formats(spec, s)
            assert DENSE in fmts
            wp = pruner.at(s)
            ref = _reference(spec, wp, b, x)
            for fmt in fmts:
                out = as_numpy(backend.layer_runner(spec, LayerChoice(fmt, wp, b, s), x)())
                assert out.shape == ref.shape, (spec.name, s, fmt)
                scale = max(1.0, float(np.abs(ref).max()))
                assert np.abs(out - ref).max() <= _tol(backend) * scale * 10, (spec.name, s, fmt)


def test_unknown_format_is_refused(backend, tiny_mlp):
    spec = tiny_mlp.layers()[0]
    w, b = _weights(tiny_mlp, spec.name)
    with pytest.raises(InvalidInputError):
        backend.layer_runner(spec, LayerChoice("no-such-format", w, b, 0.5))


def test_time_layer_levels_keeps_the_fastest_format(backend, tiny_mlp):
    spec = tiny_mlp.layers()[0]
    w, b = _weights(tiny_mlp, spec.name)
    lts = backend.time_layer_levels(spec, w, b, GRID3.levels)
    assert [lt.sparsity for lt in lts] == list(GRID3.levels)
    overhead = backend.layer_call_overhead_s()
    for lt in lts:
        assert math.isfinite(lt.time_s) and lt.time_s >= 0
        assert lt.fmt in lt.candidates and DENSE in lt.candidates
        best = min(t.median_s for t in lt.candidates.values())
        assert lt.time_s == pytest.approx(max(best - overhead, 0.0))
        assert all(t.n >= 1 for t in lt.candidates.values())


def test_standin_model_runs_and_keeps_the_output_shape(backend, tiny_mlp):
    names = [s.name for s in tiny_mlp.layers()]
    dense_out = as_numpy(backend.model_runner(tiny_mlp, {})())
    base_out = as_numpy(backend.model_runner(tiny_mlp, {n: LayerChoice(STANDIN) for n in names})())
    assert base_out.shape == dense_out.shape
    # the stand-ins return the dense layers' real outputs, so the rest computes the same values
    assert np.allclose(base_out, dense_out, atol=_tol(backend) * 10)


def test_pruned_model_computes_the_masked_model(backend, tiny_mlp):
    """End to end: the model with chosen formats equals torch with magnitude-masked weights."""
    specs = tiny_mlp.layers()
    masked = __import__("copy").deepcopy(tiny_mlp.model)
    plan = {}
    for i, spec in enumerate(specs):
        w, b = _weights(tiny_mlp, spec.name)
        s = GRID3.levels[(i + 1) % len(GRID3)]
        fmts = backend.layer_formats(spec, s)
        wp = LevelPruner(w).at(s)
        plan[spec.name] = LayerChoice(fmts[-1], wp, b, s)
        with torch.no_grad():
            masked.get_submodule(spec.name).weight.copy_(torch.from_numpy(wp))
    out = as_numpy(backend.model_runner(tiny_mlp, plan)())
    with torch.inference_mode():
        ref = tiny_mlp.forward(masked, tiny_mlp.example).numpy()
    assert np.allclose(out, ref, atol=_tol(backend) * 10, rtol=_tol(backend) * 10)


def test_profile_validate_save_and_load(backend, tiny_mlp, tmp_path):
    prof = profile_model(tiny_mlp, backend, GRID3)
    specs = tiny_mlp.layers()
    t = prof.table
    assert t.layers == tuple(s.name for s in specs)
    assert t.times.shape == (len(specs), len(GRID3))
    assert t.base_s > 0 and np.all(t.times >= 0)
    assert prof.backend == backend.name and prof.model == "tiny-mlp"
    assert prof.formats is not None and all(len(f) == len(GRID3) for f in prof.formats)
    for spec, fmts in zip(specs, prof.formats):
        for s, f in zip(GRID3.levels, fmts):
            assert f in backend.layer_formats(spec, s)
    assert prof.settings["threads"] == 1 and prof.settings["batch"] == 1 and prof.settings["seq_len"] == 32
    assert prof.fingerprint == backend.fingerprint()
    records = validate(prof, tiny_mlp, backend, k=3, seed=0)
    assert len(records) == 3
    for r in records:
        assert r["predicted_s"] > 0 and r["measured_s"] > 0
        assert 0.2 < r["predicted_s"] / r["measured_s"] < 5  # loose: a tiny model, a quick policy
    path = tmp_path / "p.json"
    save_profile(prof.with_validation(records), path)
    back = load_profile(path, specs=specs, fingerprint=backend.fingerprint())
    assert back.validation == tuple(records)
    assert np.allclose(back.table.times, t.times) and back.formats == prof.formats
    other = dict(backend.fingerprint(), cpu_model="another CPU")
    with pytest.raises(ProfileMismatchError, match="other hardware"):
        load_profile(path, specs=specs, fingerprint=other)
    assert load_profile(path, specs=specs, fingerprint=other, force=True).backend == backend.name


def test_validate_refuses_a_profile_of_another_backend(backend, tiny_mlp):
    import dataclasses

    prof = profile_model(tiny_mlp, backend, GRID3)
    with pytest.raises(InvalidInputError, match="backend"):
        validate(dataclasses.replace(prof, backend="something-else"), tiny_mlp, backend, k=1)


def test_conv_model_profiles(backend, tiny_conv):
    prof = profile_model(tiny_conv, backend, GRID3)
    assert prof.table.times.shape == (3, 3)
    assert validate(prof, tiny_conv, backend, k=1)[0]["measured_s"] > 0

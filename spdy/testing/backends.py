"""The backend conformance suite: what every latency backend must do, as plain checks.

A backend written outside spdy (subclass :class:`spdy.profilers.Backend`, register it with
:func:`spdy.profilers.register`) runs the same checks as the built-in ones::

    import pytest
    from spdy.testing.backends import CHECKS, TEST_POLICY

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_my_backend(check):
        check(MyBackend(threads=1, policy=TEST_POLICY))

Each check takes a backend made with ``threads=1`` and raises ``AssertionError`` (or the
library's own error) when the backend breaks the contract. The checks profile the tiny
models of :mod:`spdy.testing.models` on a three-level grid, so they take seconds. Nothing
here needs pytest.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spdy.errors import InvalidInputError, ProfileMismatchError
from spdy.grid import SparsityGrid
from spdy.models.base import ModelBundle
from spdy.profile import load_profile, save_profile
from spdy.profilers import DENSE, QUICK_POLICY, STANDIN, Backend, LayerChoice, as_numpy, profile_model, validate
from spdy.profilers.pruning import LevelPruner
from spdy.testing import models

__all__ = ["CHECKS", "GRID3", "TEST_POLICY", "tiny_conv", "tiny_mlp"]

#: the grid every check profiles: dense, 50 % and 90 %
GRID3 = SparsityGrid((0.0, 0.5, 0.9))
#: short, with the contention filter off: a check must not wait for a quiet machine
TEST_POLICY = dataclasses.replace(QUICK_POLICY, max_others=float("inf"))


@functools.cache
def tiny_mlp() -> ModelBundle:
    """:func:`spdy.testing.models.mlp`, made once."""
    return models.mlp()


@functools.cache
def tiny_conv() -> ModelBundle:
    """:func:`spdy.testing.models.conv`, made once."""
    return models.conv()


def _tol(backend: Backend) -> float:
    return 2e-2 if getattr(backend, "dtype_name", "float32") in ("float16", "bfloat16") else 1e-4


def _reference(spec: Any, w: np.ndarray, b: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    bt = None if b is None else torch.from_numpy(b)
    if spec.kind == "linear":
        return torch.nn.functional.linear(xt, wt, bt).numpy()
    return torch.nn.functional.conv2d(xt, wt, bt, spec.stride, spec.padding, spec.dilation).numpy()


def _weights(bundle: ModelBundle, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    m = bundle.model.get_submodule(name)
    return m.weight.detach().numpy().copy(), None if m.bias is None else m.bias.detach().numpy().copy()


@contextlib.contextmanager
def _raises(error: type[Exception], text: str = "") -> Iterator[None]:
    try:
        yield
    except error as exc:
        assert text in str(exc), f"expected {text!r} in the message; got {exc}"
    else:
        raise AssertionError(f"expected {error.__name__}{f' ({text})' if text else ''}; nothing was raised")


def check_fingerprint_names_the_machine_and_runtime(backend: Backend) -> None:
    fp = backend.fingerprint()
    for key in ("cpu_model", "logical_cores", "threads", "versions", "backend"):
        assert key in fp, key
    assert fp["threads"] == backend.threads == 1
    assert fp["backend"] == backend.name
    json.dumps(fp)  # serialisable as it goes into the profile
    assert backend.fingerprint() == fp  # stable


def check_settings_record_threads_and_timing_policy(backend: Backend) -> None:
    st = backend.settings()
    assert st["threads"] == 1
    assert st["timing"]["min_repeats"] == backend.policy.min_repeats
    json.dumps(st)


def check_every_format_computes_the_pruned_layer(backend: Backend) -> None:
    rng = np.random.default_rng(0)
    for bundle in (tiny_mlp(), tiny_conv()):
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


def check_unknown_format_is_refused(backend: Backend) -> None:
    spec = tiny_mlp().layers()[0]
    w, b = _weights(tiny_mlp(), spec.name)
    with _raises(InvalidInputError):
        backend.layer_runner(spec, LayerChoice("no-such-format", w, b, 0.5))


def check_time_layer_levels_keeps_the_fastest_format(backend: Backend) -> None:
    spec = tiny_mlp().layers()[0]
    w, b = _weights(tiny_mlp(), spec.name)
    lts = backend.time_layer_levels(spec, w, b, GRID3.levels)
    assert [lt.sparsity for lt in lts] == list(GRID3.levels)
    overhead = backend.layer_call_overhead_s()
    for lt in lts:
        assert math.isfinite(lt.time_s) and lt.time_s >= 0
        assert lt.fmt in lt.candidates and DENSE in lt.candidates
        best = min(t.median_s for t in lt.candidates.values())
        assert math.isclose(lt.time_s, max(best - overhead, 0.0), rel_tol=1e-6, abs_tol=1e-12)
        assert all(t.n >= 1 for t in lt.candidates.values())


def check_standin_model_runs_and_keeps_the_output_shape(backend: Backend) -> None:
    bundle = tiny_mlp()
    names = [s.name for s in bundle.layers()]
    dense_out = as_numpy(backend.model_runner(bundle, {})())
    base_out = as_numpy(backend.model_runner(bundle, {n: LayerChoice(STANDIN) for n in names})())
    assert base_out.shape == dense_out.shape
    # the stand-ins return the dense layers' real outputs, so the rest computes the same values
    assert np.allclose(base_out, dense_out, atol=_tol(backend) * 10)


def check_pruned_model_computes_the_masked_model(backend: Backend) -> None:
    """End to end: the model with chosen formats equals torch with magnitude-masked weights."""
    bundle = tiny_mlp()
    masked = copy.deepcopy(bundle.model)
    plan = {}
    for i, spec in enumerate(bundle.layers()):
        w, b = _weights(bundle, spec.name)
        s = GRID3.levels[(i + 1) % len(GRID3)]
        fmts = backend.layer_formats(spec, s)
        wp = LevelPruner(w).at(s)
        plan[spec.name] = LayerChoice(fmts[-1], wp, b, s)
        with torch.no_grad():
            masked.get_submodule(spec.name).weight.copy_(torch.from_numpy(wp))
    out = as_numpy(backend.model_runner(bundle, plan)())
    with torch.inference_mode():
        ref = bundle.forward(masked, bundle.example).numpy()
    assert np.allclose(out, ref, atol=_tol(backend) * 10, rtol=_tol(backend) * 10)


def check_profile_validate_save_and_load(backend: Backend) -> None:
    bundle = tiny_mlp()
    prof = profile_model(bundle, backend, GRID3)
    specs = bundle.layers()
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
    records = validate(prof, bundle, backend, k=3, seed=0)
    assert len(records) == 3
    for r in records:
        assert r["predicted_s"] > 0 and r["measured_s"] > 0
        assert 0.2 < r["predicted_s"] / r["measured_s"] < 5  # loose: a tiny model, a quick policy
    with tempfile.TemporaryDirectory(prefix="spdy-conformance-") as tmp:
        path = Path(tmp) / "p.json"
        save_profile(prof.with_validation(records), path)
        back = load_profile(path, specs=specs, fingerprint=backend.fingerprint())
        assert back.validation == tuple(records)
        assert np.allclose(back.table.times, t.times) and back.formats == prof.formats
        other = dict(backend.fingerprint(), cpu_model="another CPU")
        with _raises(ProfileMismatchError, "other hardware"):
            load_profile(path, specs=specs, fingerprint=other)
        assert load_profile(path, specs=specs, fingerprint=other, force=True).backend == backend.name


def check_validate_refuses_a_profile_of_another_backend(backend: Backend) -> None:
    prof = profile_model(tiny_mlp(), backend, GRID3)
    with _raises(InvalidInputError, "backend"):
        validate(dataclasses.replace(prof, backend="something-else"), tiny_mlp(), backend, k=1)


def check_conv_model_profiles(backend: Backend) -> None:
    prof = profile_model(tiny_conv(), backend, GRID3)
    assert prof.table.times.shape == (3, 3)
    assert validate(prof, tiny_conv(), backend, k=1)[0]["measured_s"] > 0


#: every check, in the order they are best run (cheap ones first)
CHECKS: tuple[Callable[[Backend], None], ...] = (
    check_fingerprint_names_the_machine_and_runtime,
    check_settings_record_threads_and_timing_policy,
    check_every_format_computes_the_pruned_layer,
    check_unknown_format_is_refused,
    check_time_layer_levels_keeps_the_fastest_format,
    check_standin_model_runs_and_keeps_the_output_shape,
    check_pruned_model_computes_the_masked_model,
    check_profile_validate_save_and_load,
    check_validate_refuses_a_profile_of_another_backend,
    check_conv_model_profiles,
)

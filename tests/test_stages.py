"""Stage helpers: the profile cache follows the latency model's version."""

from __future__ import annotations

import logging

from torch import nn

from spdy import stages
from spdy.grid import SparsityGrid
from spdy.models.base import ModelBundle
from spdy.profile import save_profile
from spdy.profilers import get_backend, profile_model
from spdy.profilers import profiler as profiler_module
from spdy.testing.backends import TEST_POLICY


def _bundle() -> ModelBundle:
    import torch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    return ModelBundle(name="two-linears", model=model, calibration=[torch.randn(16, 64)])


def test_a_new_latency_model_version_measures_the_profile_again(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SPDY_CACHE", str(tmp_path))
    bundle, be, grid = _bundle(), get_backend("spdy-cpu", threads=1, policy=TEST_POLICY), SparsityGrid((0.0, 0.9))
    specs = bundle.layers()
    version = profiler_module.LATENCY_MODEL_VERSION
    now = stages.profile_cache_path(bundle, be, grid, specs)
    monkeypatch.setattr(profiler_module, "LATENCY_MODEL_VERSION", version + 1)
    assert stages.profile_cache_path(bundle, be, grid, specs) != now  # a cached table of the old model is not reused
    monkeypatch.setattr(profiler_module, "LATENCY_MODEL_VERSION", version - 1)

    # a profile given by path is used, with a warning when an older latency model measured it
    old = profile_model(bundle, be, grid, fit_models=0)
    assert old.settings["latency_model_version"] == version - 1
    monkeypatch.undo()
    save_profile(old, tmp_path / "old.json")
    with caplog.at_level(logging.WARNING, logger="spdy.stages"):
        got, _path, measured = stages.ensure_profile(bundle, be, path=tmp_path / "old.json", grid=grid)
    assert not measured and got.settings["latency_model_version"] == version - 1
    assert f"latency model version {version - 1}, this spdy's is {version}" in caplog.text

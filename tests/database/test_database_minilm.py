"""End to end on the built-in MiniLM (minutes): run with ``pytest -m slow tests/database``."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from spdy.database import Database, build_database
from spdy.database.reconstruction import zeros_per_level
from spdy.grid import DEFAULT_GRID

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    from spdy.models.base import load_model

    return load_model("minilm")


@pytest.fixture(scope="module")
def obs_db(minilm, tmp_path_factory) -> Database:
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("minilm") / "obs"
    t0 = time.perf_counter()
    db = build_database(minilm, out, progress=False)
    db.build_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
    return db


def test_minilm_obs_build(obs_db: Database, minilm) -> None:
    db = obs_db
    assert len(db.layers) == 36 and len(db.grid) == 42
    assert db.verify() == []
    db.check_compatible(minilm, grid=DEFAULT_GRID)
    assert db.build_seconds < 180  # type: ignore[attr-defined]
    assert np.all(db.errors[:, 0] == 0) and np.all(np.isfinite(db.errors))
    mean = db.errors.mean(0)
    assert np.all(np.diff(mean) > 0)  # more sparsity, more error, on average
    assert db.total_bytes() < db.dense_bytes() / 4
    for i, spec in enumerate(db.specs[:6]):
        for lv in (1, 20, 41):
            assert int((db.weight(i, lv) == 0).sum()) == zeros_per_level(DEFAULT_GRID.as_array(), spec.numel)[lv]


def test_minilm_obs_beats_magnitude(obs_db: Database, minilm, tmp_path) -> None:
    mag = build_database(minilm, tmp_path / "mag", method="magnitude", progress=False)
    assert np.all(obs_db.errors <= mag.errors + 1e-7)


def test_minilm_stitch_is_cheap_next_to_a_loss_evaluation(obs_db: Database, minilm) -> None:
    dense = minilm.outputs()
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(5):
        levels = {n: int(rng.integers(1, 42)) for n in obs_db.layers}
        obs_db.clear_cache()
        t = time.perf_counter()
        obs_db.stitch(minilm.model, levels)  # cold: decoded from the files
        stitch_s = time.perf_counter() - t
        t = time.perf_counter()
        minilm.calibration_loss(minilm.model, dense)
        ratios.append(stitch_s / (time.perf_counter() - t))
    obs_db.stitch(minilm.model, {n: 0 for n in obs_db.layers})
    assert float(np.median(ratios)) <= 0.10

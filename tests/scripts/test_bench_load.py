"""scripts/bench_load.py: models timed next to a neighbour process, which is gone afterwards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_load  # noqa: E402

from spdy.profilers import Timing  # noqa: E402


class FakeBackend:
    """Times models as given; notes whether the neighbour process was running meanwhile."""

    def __init__(self, seconds: list[float], procs: list[subprocess.Popen]) -> None:
        self.seconds, self.procs = seconds, procs
        self.running_while_timed: list[bool] = []

    def time_models(self, bundle, plans):
        self.running_while_timed = [p.poll() is None for p in self.procs]
        return [Timing.from_samples([s], 1) for s in self.seconds]


@pytest.fixture
def started(monkeypatch):
    procs: list[subprocess.Popen] = []
    real = subprocess.Popen

    def popen(*a, **kw):
        procs.append(real(*a, **kw))
        return procs[-1]

    monkeypatch.setattr(bench_load.subprocess, "Popen", popen)
    return procs


@pytest.mark.parametrize("neighbour", sorted(bench_load.NEIGHBOURS))
def test_a_neighbour_runs_while_models_are_timed_and_is_gone_after(neighbour, started):
    be = FakeBackend([0.02, 0.01, 0.005], started)
    got = bench_load.speedups_under(be, None, [{}, {}, {}], neighbour)
    assert got == pytest.approx([2.0, 4.0])  # over the first plan, the dense one
    assert be.running_while_timed == [True]
    assert started[0].poll() is not None  # killed and reaped


def test_quiet_rounds_start_no_process(started):
    be = FakeBackend([0.02, 0.01], started)
    assert bench_load.speedups_under(be, None, [{}, {}], None) == pytest.approx([2.0])
    assert started == [] and be.running_while_timed == []

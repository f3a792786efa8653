"""spdy.storage: opening a storage from a URL, and several workers on one search - on a
journal file, an SQLite file (several processes) and a real PostgreSQL server alike.

The worker processes run :func:`work`: an SPDY search (16 trials of a synthetic problem,
``delay`` seconds each, one thread) on the shared study. Wall-time claims are not tested
here; ``scripts/bench_workers.py`` measures them with ``spdy search --evaluate-only``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from spdy.errors import StorageError
from spdy.grid import spdy_grid
from spdy.sensitivity import Search, SearchConfig
from spdy.storage import RetryTrial, make_storage, rdb_url, slots
from spdy.types import LatencyTable

ROOT = Path(__file__).resolve().parents[1]
STUDY = "shared"
#: heartbeats in the worker tests: every second, a trial without one for 3 s is retried
FAST_BEATS = {"heartbeat_s": 1.0, "stale_after_s": 3.0}
COMPLETE, RUNNING, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL


GRID = spdy_grid(9)
SENS = np.array([5.0, 0.5, 2.0, 0.2, 3.0, 1.0])


def table() -> LatencyTable:
    """Six layers whose time is proportional to their density, plus a fixed overhead."""
    dens = 1 - GRID.as_array()
    sizes = np.array([1.0, 2.0, 1.0, 4.0, 1.0, 2.0])
    return LatencyTable([f"l{i}" for i in range(6)], GRID, sizes[:, None] * (0.1 + 0.9 * dens[None, :]) * 1e-3, 1e-4)


def objective(levels: np.ndarray) -> float:
    """A loss with hidden per-layer sensitivities."""
    return float((SENS * GRID.as_array()[levels] ** 4).sum())


class Interrupted:
    """``objective``, interrupted (as by Ctrl-C) at its ``at``-th call."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, levels: np.ndarray) -> float:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return objective(levels)


def cfg(**kw: Any) -> SearchConfig:
    """Algorithm 4 in miniature: 6 random trials, then 2 x 5 local ones (16 in all)."""
    return SearchConfig(**{"speedup": 2.0, "k": 5, "delta": 0.3, "seed": 3, "strategy": "spdy", **FAST_BEATS, **kw})


TOTAL = 16
pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),  # RetryTrial.retry_history
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")]  # study.ask() here


class SlowSearch(Search):
    """A search whose every trial takes ``delay`` seconds, as a real model's loss would (cached ones too)."""

    delay = 0.0
    evaluated = 0

    def _evaluate(self, number: int, trial: optuna.trial.Trial) -> float | None:
        self.evaluated += 1
        time.sleep(self.delay)
        return super()._evaluate(number, trial)


def work(store: str, delay: float, ready: str | None = None) -> None:
    """One worker process: the shared search until every trial is complete; prints what it evaluated.

    With ``ready`` (a folder), it writes its pid there once set up and starts when ``ready/go`` exists.
    """
    s = SlowSearch(table(), objective, cfg(), storage=store, study_name=STUDY)
    s.delay = delay
    if ready is not None:
        (Path(ready) / str(os.getpid())).touch()
        while not (Path(ready) / "go").exists():
            time.sleep(0.02)
    res = s.run()
    print(json.dumps({"pid": os.getpid(), "evaluated": s.evaluated, "evaluations": res.n_evaluations}), flush=True)


def start_worker(store: str, delay: float, ready: Path | None = None) -> subprocess.Popen[str]:
    code = f"from tests.test_storage import work; work({store!r}, {delay!r}, {str(ready) if ready else None!r})"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"worker {p.pid} exited with {p.returncode}"
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


_STORAGES: dict[str, Any] = {}


def trials(store: str) -> list[optuna.trial.FrozenTrial]:
    if store not in _STORAGES:
        _STORAGES[store] = make_storage(store)
    return optuna.load_study(study_name=STUDY, storage=_STORAGES[store]).get_trials()


def start_together(store: str, n: int, delay: float, tmp: Path) -> list[subprocess.Popen[str]]:
    """``n`` workers that start searching at the same moment, once all are set up."""
    ready = tmp / "ready"
    ready.mkdir()
    procs = [start_worker(store, delay, ready) for _ in range(n)]
    deadline = time.monotonic() + 120
    while len(list(ready.iterdir())) < n:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker failed to set up"
        time.sleep(0.05)
    (ready / "go").touch()
    return procs


def fresh_trial_of(store: str, pid: int, younger_than: float = 0.25, timeout: float = 60) -> optuna.trial.FrozenTrial:
    """Wait until worker ``pid`` has just started a trial (less than ``younger_than`` s ago: it is
    in the middle of it, asleep in its ``delay``); that trial."""
    me = f"{socket.gethostname()}:{pid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for t in trials(store):
                if t.state == RUNNING and t.user_attrs.get("worker") == me and "slot" in t.user_attrs:
                    assert t.datetime_start is not None
                    if (datetime.now() - t.datetime_start).total_seconds() < younger_than:
                        time.sleep(0.05)  # past the writes that recorded it (a journal's lock file is gone)
                        return t
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.02)
    raise AssertionError(f"worker {pid} started no trial in {timeout} s")


def kill(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()  # reaped: its pid is gone from this host


def check_every_slot_once(store: str, total: int = TOTAL) -> dict[int, optuna.trial.FrozenTrial]:
    """Each slot of the schedule completed by exactly one trial (none past it); slot -> that trial."""
    ts = trials(store)
    slot_of = slots(ts)
    done: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for t in ts:
        if t.state == COMPLETE:
            done.setdefault(slot_of[t.number], []).append(t)
    assert sorted(done) == list(range(total)), sorted(done)
    assert all(len(v) == 1 for v in done.values()), {s: [t.number for t in v] for s, v in done.items() if len(v) > 1}
    return {s: v[0] for s, v in done.items()}


@pytest.fixture(scope="module")
def one_worker() -> dict[int, float]:
    """One worker's losses by slot (in memory, same seed)."""
    return {h["number"]: h["loss"] for h in Search(table(), objective, cfg()).run().history}


def check_random_phase(done: dict[int, optuna.trial.FrozenTrial], one_worker: dict[int, float]) -> None:
    """The random phase (slots 0-5) drew exactly one worker's candidates: the same losses, the same best."""
    random = range(6)
    assert [done[s].value for s in random] == [one_worker[s] for s in random]
    assert min(done[s].value for s in random) == min(one_worker[s] for s in random)


# -- opening a storage -------------------------------------------------------------


def test_a_plain_postgresql_url_means_psycopg_3() -> None:
    assert rdb_url("postgresql://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    assert rdb_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert rdb_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"  # a driver given is kept
    assert rdb_url("sqlite:///x.db") == "sqlite:///x.db"


def test_a_missing_driver_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a))
    with pytest.raises(StorageError) as info:
        make_storage("postgresql://u:secret@db.example/spdy")
    msg = str(info.value)
    assert "pip install 'spdy[postgres]'" in msg and "secret" not in msg and len(msg.splitlines()) == 1


def test_an_unreachable_server_is_one_line_without_the_password() -> None:
    pytest.importorskip("psycopg")
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StorageError) as info:
        make_storage(f"postgresql://u:secret@127.0.0.1:{port}/spdy")
    msg = str(info.value)
    assert "cannot open the storage" in msg and "check that the server runs" in msg
    assert "secret" not in msg and "***" in msg and len(msg.splitlines()) == 1


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_workers_opening_a_new_database_at_once_all_get_it(kind: str, tmp_path: Path,
                                                          request: pytest.FixtureRequest) -> None:
    """Optuna creates its tables on first open; processes that race for it open it all the same."""
    url = f"sqlite:///{tmp_path / 'new.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    code = f"from spdy.storage import make_storage; make_storage({url!r}, heartbeat_s=1, grace_s=3)"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]


# -- one process, every storage ------------------------------------------------------


def test_a_retry_takes_the_slot_of_the_trial_it_retries(shared_storage: str) -> None:
    s = Search(table(), objective, cfg(), storage=shared_storage, study_name=STUDY)
    a = s.study.ask()
    s.study.ask()  # trials 0 and 1: slots 0 and 1
    assert s.shared.fail_and_retry(a.number) and not s.shared.fail_and_retry(a.number)  # failed once only
    retry = s.study.ask()  # the waiting retry (trial 2) is taken first
    new = s.study.ask()  # trial 3: the next slot
    ts = s.shared.trials()
    assert [t.state for t in ts] == [FAIL, RUNNING, RUNNING, RUNNING]
    assert (retry.number, new.number) == (2, 3) and slots(ts) == {0: 0, 1: 1, 2: 0, 3: 2}
    assert RetryTrial.retry_history(ts[2]) == [0] and ts[2].user_attrs == {}  # no owner of the failed trial


def test_a_trial_just_asked_for_is_not_stale(shared_storage: str) -> None:
    # between another worker's ask() and its first user attribute the trial has no worker
    # and no heartbeat: it must not look abandoned (that race once let two workers run trial 0)
    a = Search(table(), objective, cfg(), storage=shared_storage, study_name=STUDY)
    a.study.ask()
    b = Search(table(), objective, cfg(), storage=shared_storage, study_name=STUDY)
    b.shared.worker = "elsewhere:1"
    assert b.shared.reclaim(TOTAL) == 0
    assert [t.state for t in b.shared.trials()] == [RUNNING]


def test_the_late_result_of_a_worker_taken_for_gone_is_dropped(shared_storage: str) -> None:
    a = Search(table(), objective, cfg(), storage=shared_storage, study_name=STUDY)
    t = a.study.ask()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    t.set_user_attr("worker", f"{socket.gethostname()}:{int(gone.stdout)}")  # a process that has exited: b retries

    class LateFirst:
        """The worker taken for gone was alive after all: it tells its result while b evaluates the retry."""

        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, levels: np.ndarray) -> float:
            self.calls += 1
            if self.calls == 1:
                assert a.shared.tell(t, 123.0) is False  # dropped: the trial was failed and is retried
            return objective(levels)

    b = Search(table(), LateFirst(), cfg(), storage=shared_storage, study_name=STUDY)
    res = b.run()
    done = check_every_slot_once(shared_storage)
    assert done[0].value != 123.0 and done[0].number != t.number
    assert [x.state for x in b.shared.trials() if x.number == t.number] == [FAIL]
    assert [h["number"] for h in res.history] == list(range(TOTAL))


def test_a_slot_left_without_a_live_trial_is_retried_once(shared_storage: str) -> None:
    # a worker died between failing a trial and retrying it: whoever sees the slot retries it;
    # two retries of one slot (two workers saw it at once) are resolved when taken
    a = Search(table(), objective, cfg(), storage=shared_storage, study_name=STUDY)
    t = a.study.ask()
    a.study.tell(t, state=FAIL)
    assert a.shared.reclaim(TOTAL) == 1
    RetryTrial()(a.study, a.shared.trials()[0])  # a second worker's retry of the same slot
    assert a.shared.reclaim(TOTAL) == 0  # the slot has a retry waiting now
    res = a.run()
    assert [h["number"] for h in res.history] == list(range(TOTAL))
    done = check_every_slot_once(shared_storage)
    skipped = [x for x in a.shared.trials() if "skipped" in x.user_attrs]
    assert len(skipped) == 1 and "held by trial" in skipped[0].user_attrs["skipped"]
    assert skipped[0].number > done[0].number


def test_an_interrupted_worker_retries_its_trial_and_a_rerun_resumes(shared_storage: str,
                                                                    one_worker: dict[int, float]) -> None:
    with pytest.raises(KeyboardInterrupt):
        Search(table(), Interrupted(at=7), cfg(), storage=shared_storage, study_name=STUDY).run()
    ts = trials(shared_storage)
    n_done = sum(t.state == COMPLETE for t in ts)
    assert [t.state for t in ts] == [COMPLETE] * n_done + [FAIL, optuna.trial.TrialState.WAITING]  # retried
    again = SlowSearch(table(), objective, cfg(), storage=shared_storage, study_name=STUDY)
    res = again.run()
    assert again.evaluated == TOTAL - n_done  # nothing evaluated again
    assert [h["number"] for h in res.history] == list(range(TOTAL))
    assert [h["loss"] for h in res.history] == [one_worker[s] for s in range(TOTAL)]  # as if never interrupted


# -- worker processes, every storage ---------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_workers_do_every_trial_once(shared_storage: str, n: int, one_worker: dict[int, float], tmp_path: Path) -> None:
    reports = finish(start_together(shared_storage, n, 0.25, tmp_path))
    done = check_every_slot_once(shared_storage)
    check_random_phase(done, one_worker)
    assert all(r["evaluations"] == TOTAL for r in reports)  # each saw the whole search done
    by = {t.user_attrs["worker"] for t in done.values()}
    assert len(by) >= 2, by  # shared, not one worker doing it all
    assert not [t for t in trials(shared_storage) if t.state == FAIL]


def test_a_killed_workers_trial_is_retried_and_finished_by_another(shared_storage: str,
                                                                  one_worker: dict[int, float]) -> None:
    a, b = start_worker(shared_storage, 0.4), start_worker(shared_storage, 0.4)
    victim = fresh_trial_of(shared_storage, a.pid)
    kill(a)
    (report,) = finish([b])
    assert report["evaluations"] == TOTAL
    done = check_every_slot_once(shared_storage)
    check_random_phase(done, one_worker)
    slot = victim.user_attrs["slot"]
    killed = [t for t in trials(shared_storage) if t.number == victim.number][0]
    assert killed.state == FAIL  # not completed by anyone: its slot was evaluated by the retry
    assert RetryTrial.retry_history(done[slot])[0] == victim.number
    assert done[slot].user_attrs["worker"].endswith(f":{b.pid}")


def test_killing_every_worker_and_starting_again_resumes(shared_storage: str, one_worker: dict[int, float]) -> None:
    procs = [start_worker(shared_storage, 0.4) for _ in range(2)]
    fresh_trial_of(shared_storage, procs[1].pid)
    kill(procs[1])
    fresh_trial_of(shared_storage, procs[0].pid)
    kill(procs[0])
    before = sum(t.state == COMPLETE for t in trials(shared_storage))
    (report,) = finish([start_worker(shared_storage, 0.0)])
    assert report["evaluations"] == TOTAL and report["evaluated"] == TOTAL - before  # nothing evaluated twice
    done = check_every_slot_once(shared_storage)
    check_random_phase(done, one_worker)
    assert sum(t.state == FAIL for t in trials(shared_storage)) >= 2  # the two killed trials, retried


def test_a_stopped_worker_is_retried_after_its_heartbeat_and_its_late_result_dropped(
        shared_storage: str, one_worker: dict[int, float]) -> None:
    # a worker that is alive but silent (here: stopped; elsewhere: another host that lost
    # its network) is judged by its heartbeat: after stale_after_s its trial is retried
    a, b = start_worker(shared_storage, 0.4), start_worker(shared_storage, 0.4)
    victim = fresh_trial_of(shared_storage, a.pid)  # stopped asleep in the trial: holding no lock on the storage
    a.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 60
        while [t.state for t in trials(shared_storage) if t.number == victim.number] == [RUNNING]:
            assert time.monotonic() < deadline, "the stopped worker's trial was never retried"
            time.sleep(0.2)
    finally:
        a.send_signal(signal.SIGCONT)
    reports = finish([a, b])
    assert all(r["evaluations"] == TOTAL for r in reports)
    done = check_every_slot_once(shared_storage)
    check_random_phase(done, one_worker)
    slot = victim.user_attrs["slot"]
    assert done[slot].number != victim.number and RetryTrial.retry_history(done[slot])[0] == victim.number


# -- the CLI: `spdy search --evaluate-only` workers on PostgreSQL ------------------------


def mlp() -> dict[str, Any]:
    """An MLP with seeded random weights (the same in every process) and four calibration batches."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    return {"model": model, "calibration": [torch.randn(64, 64) for _ in range(4)]}


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A latency profile (quick timings, one thread) and a reconstruction database of :func:`mlp`."""
    from spdy.api import as_bundle
    from spdy.grid import SparsityGrid
    from spdy.profilers import get_backend
    from spdy.stages import ensure_database, ensure_profile
    from spdy.testing.backends import TEST_POLICY

    grid = SparsityGrid((0.0, 0.5, 0.7, 0.8, 0.9, 0.95))
    bundle = as_bundle("tests.test_storage:mlp")
    folder = tmp_path_factory.mktemp("mlp")
    _, profile, _ = ensure_profile(bundle, get_backend("spdy-cpu", threads=1, policy=TEST_POLICY),
                                   path=folder / "profile.json", grid=grid)
    ensure_database(bundle, path=folder / "db", grid=grid).close()
    return profile, folder / "db"


def test_evaluate_only_workers_of_the_cli_share_a_search_on_postgresql(mlp_files: tuple[Path, Path], postgres_url: str,
                                                                       tmp_path: Path) -> None:
    """Two ``spdy search --evaluate-only`` processes on a study in PostgreSQL (the plain URL a user
    types) do every evaluation once; the main command then finds them all done and writes the result."""
    profile, db = mlp_files
    cmd = [sys.executable, "-m", "spdy.cli", "search", "--model", "tests.test_storage:mlp", "--speedup", "1.5x",
           "--threads", "1", "--eval-threads", "1", "--profile", str(profile), "--database", str(db),
           "--storage", postgres_url, "--study", "cli", "--max-evals", "8", "--strategy", "spdy", "--no-measure"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPDY_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([*cmd, "--evaluate-only"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert "the study 'cli' holds 8 evaluations" in out
    study = optuna.load_study(study_name="cli", storage=make_storage(postgres_url))
    slot_of = slots(study.trials)
    assert sorted(slot_of[t.number] for t in study.trials if t.state == COMPLETE) == list(range(8))
    n_trials = len(study.trials)
    done = subprocess.run([*cmd, "--no-baselines", "-o", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["search"]["evaluations"] == 8 and not result["search"]["per_evaluation_ms"]  # none evaluated again
    assert len(optuna.load_study(study_name="cli", storage=make_storage(postgres_url)).trials) == n_trials

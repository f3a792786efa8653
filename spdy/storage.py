"""The Optuna storage a search keeps its trials in, and what lets several workers share it.

:func:`make_storage` opens a storage from what a user types: a journal file path, or an
RDB URL (``sqlite:///f.db``, ``postgresql://user@host/db``, ``mysql://...``). A PostgreSQL
URL without a driver is opened with psycopg 3 (``pip install 'spdy[postgres]'``), which
is what SQLAlchemy 2.1 does too (2.0 would pick psycopg2). A storage that cannot be
opened or lacks its driver raises :class:`~spdy.errors.StorageError` with what to do.

Workers find out about each other only through the storage:

* **Slots.** The search's schedule position of a trial (its *slot*) is the count of the
  trials before it that are not retries (:func:`slots`). Every storage hands out trial
  numbers one at a time, so every worker counts the same.
* **Heartbeats.** While a worker evaluates a trial, :class:`Heartbeat` beats for it from a
  thread: Optuna's heartbeat on an RDB storage opened with ``heartbeat_s`` (the beats
  carry the database server's clock), otherwise the trial's user attribute ``heartbeat``
  (seconds since the epoch on the worker's clock).
* **Retries.** A trial whose worker is gone is failed (the transition to FAIL succeeds
  for one worker only) and retried: :class:`RetryTrial`, Optuna's
  ``RetryHeartbeatStaleTrialCallback``, adds a WAITING copy that the next
  ``study.ask()`` of any worker takes, marked with the original trial's number
  (system attributes ``failed_trial`` and ``retry_history``), so it takes that slot.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from spdy.errors import StorageError

log = logging.getLogger(__name__)

#: seconds an SQLite connection waits for another process's write lock
SQLITE_BUSY_S = 60.0
#: seconds to wait for a PostgreSQL server that does not answer
CONNECT_TIMEOUT_S = 10
#: attempts at opening an RDB storage while other workers create its tables at the same time
OPEN_TRIES = 8
#: how to install the driver module SQLAlchemy could not import, by module name
DRIVERS = {"psycopg": "pip install 'spdy[postgres]'", "psycopg2": "pip install psycopg2-binary",
           "MySQLdb": "pip install mysqlclient", "pymysql": "pip install PyMySQL"}
#: states of a trial that holds its slot for now (a COMPLETE one holds it for good)
LIVE = (TrialState.WAITING, TrialState.RUNNING)


def rdb_url(url: str) -> str:
    """The SQLAlchemy URL of ``url``: ``postgresql://`` (or ``postgres://``) gets the psycopg 3 driver."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg://" + rest
    return url


def shown_url(url: str) -> str:
    """``url`` as it may appear in a message: with its password hidden."""
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: show it as given
        return url


def make_storage(url: str | None, *, heartbeat_s: float | None = None,
                 grace_s: float | None = None) -> optuna.storages.BaseStorage | None:
    """None (in memory) for None or ``:memory:``; an RDB storage for a URL; else a journal file at that path.

    With ``heartbeat_s``, an RDB storage records Optuna's heartbeats every ``heartbeat_s``
    (rounded up to whole seconds, as Optuna takes them) and counts a trial as stale when
    its last beat is older than ``grace_s``; stale trials are retried (:class:`RetryTrial`).
    """
    if url is None or url == ":memory:":
        return None
    if "://" not in url:
        backend = optuna.storages.journal.JournalFileBackend(
            url, lock_obj=optuna.storages.journal.JournalFileOpenLock(url)
        )
        return optuna.storages.JournalStorage(backend)
    return _open_rdb(url, heartbeat_s, grace_s)


def _open_rdb(url: str, heartbeat_s: float | None, grace_s: float | None) -> optuna.storages.RDBStorage:
    import sqlalchemy.exc

    full = rdb_url(url)
    kw: dict[str, Any] = {}
    if full.startswith("sqlite"):
        kw["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_BUSY_S}}
    elif full.startswith("postgresql") and "connect_timeout" not in full:
        kw["engine_kwargs"] = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    if heartbeat_s is not None:
        beat = max(1, math.ceil(heartbeat_s))
        kw.update(heartbeat_interval=beat, grace_period=max(beat + 1, math.ceil(grace_s or 2 * beat)),
                  heartbeat_stale_trial_callback=RetryTrial())
    _check_driver(full, url)
    for attempt in range(OPEN_TRIES):
        try:
            with _quiet_experimental():
                return optuna.storages.RDBStorage(full, **kw)
        except ImportError as exc:
            raise StorageError(_missing_driver(exc.name or "?", url)) from None
        except sqlalchemy.exc.ArgumentError as exc:
            raise StorageError(f"storage {shown_url(url)!r} is not a database URL SQLAlchemy knows ({_first_line(exc)}); "
                               "give sqlite:///FILE, postgresql://USER@HOST/DB, mysql://... or a journal file path") from None
        except sqlalchemy.exc.OperationalError as exc:
            # SQLite: another worker holds the lock or created the same table a moment ago
            if ("locked" in str(exc) or "already exists" in str(exc)) and attempt + 1 < OPEN_TRIES:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise StorageError(f"cannot open the storage {shown_url(url)!r}: {_first_line(exc.orig or exc)}; check that "
                               "the server runs and the URL (user, password, host, port, database) is right") from None
        except sqlalchemy.exc.DBAPIError as exc:
            # PostgreSQL: another worker created the same tables at the same moment: open again, they exist now
            if attempt + 1 < OPEN_TRIES:
                log.debug("opening %s again after %s", shown_url(url), _first_line(exc))
                time.sleep(0.2 * (attempt + 1))
                continue
            raise StorageError(f"cannot open the storage {shown_url(url)!r}: {_first_line(exc.orig or exc)}") from None
    raise AssertionError("unreachable")


def _check_driver(full: str, url: str) -> None:
    """PostgreSQL over psycopg 3 needs the module ``psycopg``: say how to install it."""
    if full.startswith("postgresql+psycopg://") and importlib.util.find_spec("psycopg") is None:
        raise StorageError(_missing_driver("psycopg", url))


def _missing_driver(module: str, url: str) -> str:
    how = DRIVERS.get(module, f"pip install {module}")
    return f"storage {shown_url(url)!r} needs the database driver {module!r}, which is not installed: {how}"


def _first_line(exc: BaseException | Any) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    """Within: no ExperimentalWarning from Optuna's heartbeat and retry API, which spdy relies on knowingly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def optuna_beats(storage: optuna.storages.BaseStorage | None) -> bool:
    """Whether ``storage`` records Optuna's heartbeats (an RDB storage opened with ``heartbeat_s``)."""
    return isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's heartbeat check: fail the study's trials whose heartbeat stopped, and retry them."""
    with _quiet_experimental():
        optuna.storages.fail_stale_trials(study)


class RetryTrial(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a failed trial (a WAITING copy with its parameters, marked with its
    number), without the failed worker's user attributes: a retry carries no owner or
    heartbeat of the worker that is gone until the worker that takes it records its own."""

    def __init__(self) -> None:
        with _quiet_experimental():
            super().__init__(max_retry=None)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bare = copy.copy(trial)
        bare.user_attrs = {}
        super().__call__(study, bare)


def slots(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[int, int]:
    """Trial number -> slot: trials that are not retries count 0, 1, 2, ... in number order,
    a retry takes the slot of the trial it retries (the first of its series of retries)."""
    out: dict[int, int] = {}
    fresh = 0
    with _quiet_experimental():
        for t in sorted(trials, key=lambda t: t.number):
            history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(t)
            if history and history[0] in out:
                out[t.number] = out[history[0]]
            else:
                out[t.number] = fresh
                fresh += 1
    return out


class Heartbeat:
    """Beats for one RUNNING trial every ``interval_s`` from a thread, while the ``with`` block runs.

    The first beat is written before the block starts. On an RDB storage with Optuna's
    heartbeats it is Optuna's (:meth:`RDBStorage.record_heartbeat`); on any other storage
    the trial's user attribute ``heartbeat``. A beat that fails is logged and tried again
    at the next interval; a trial finished meanwhile (failed by another worker) ends the beats.
    """

    def __init__(self, storage: optuna.storages.BaseStorage | None, study: optuna.Study,
                 trial: optuna.trial.Trial, interval_s: float) -> None:
        self.storage, self.trial, self.interval_s = storage, trial, interval_s
        self._trial_id: int | None = None
        if optuna_beats(storage):
            assert storage is not None
            study_id = storage.get_study_id_from_name(study.study_name)
            self._trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"spdy-heartbeat-{trial.number}", daemon=True)

    def beat(self) -> None:
        if self._trial_id is not None:
            self.storage.record_heartbeat(self._trial_id)  # type: ignore[union-attr]
        else:
            self.trial.set_user_attr("heartbeat", time.time())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except optuna.exceptions.UpdateFinishedTrialError:
                return
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next beat may get through
                log.warning("heartbeat of trial %d failed: %s", self.trial.number, _first_line(exc))

    def __enter__(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class SharedStudy:
    """One worker's hold on a study that other workers may share through its storage.

    It hands out the next trial to evaluate (:meth:`take`), beats for it while it is
    evaluated (:meth:`evaluate`), records its value (:meth:`tell`), and retries the trials
    of workers that are gone (:meth:`reclaim`). ``total`` of each call is the number of
    slots in the schedule: slots from ``total`` on are not evaluated.
    """

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage, heartbeat_s: float,
                 stale_after_s: float) -> None:
        self.study, self.storage = study, storage
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._optuna_beats = optuna_beats(storage)
        self._study_id = storage.get_study_id_from_name(study.study_name)

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    # -- which trial next ------------------------------------------------------
    def take(self, total: int) -> tuple[optuna.trial.Trial, int] | None:
        """The next trial to evaluate and its slot: a waiting retry, else a new slot; None when
        every slot is taken (complete, or running elsewhere).

        A trial that turns out to lie past the schedule (another worker took the last slot
        meanwhile) or to retry a slot that another trial holds is told PRUNED with the
        user attribute ``skipped``, and the next one is taken.
        """
        while True:
            trials = self.trials()
            slot_of = slots(trials)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting and len(set(slot_of.values())) >= total:
                return None
            with warnings.catch_warnings():  # heartbeats without Study.optimize: spdy beats itself (Heartbeat)
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trial = self.study.ask()
            trials = self.trials()
            slot_of = slots(trials)
            slot = slot_of[trial.number]
            if slot >= total:
                self._skip(trial, "over budget")
                continue
            holder = next((t for t in trials if slot_of[t.number] == slot and t.number != trial.number and (
                t.state == TrialState.COMPLETE or (t.state in LIVE and t.number < trial.number))), None)
            if holder is not None:
                self._skip(trial, f"slot {slot} is held by trial {holder.number}")
                continue
            return trial, slot

    def _skip(self, trial: optuna.trial.Trial, why: str) -> None:
        trial.set_user_attr("skipped", why)
        self.study.tell(trial, state=TrialState.PRUNED)

    def finished(self, total: int) -> bool:
        """Whether every slot below ``total`` holds a COMPLETE trial."""
        trials = self.trials()
        slot_of = slots(trials)
        done = {slot_of[t.number] for t in trials if t.state == TrialState.COMPLETE}
        return all(s in done for s in range(total))

    # -- one evaluation ----------------------------------------------------------
    def evaluate(self, trial: optuna.trial.Trial, slot: int, fn: Callable[[], float | None]) -> float | None:
        """``fn()`` for ``trial``, with the trial's owner (user attribute ``worker``), slot and heartbeats
        recorded; None when another worker failed the trial meanwhile (its retry evaluates the slot).

        An exception (Ctrl-C included) fails the trial and retries it before it propagates.
        """
        try:
            with Heartbeat(self.storage, self.study, trial, self.heartbeat_s):
                trial.set_user_attr("worker", self.worker)
                trial.set_user_attr("slot", slot)
                return fn()
        except optuna.exceptions.UpdateFinishedTrialError:
            return None
        except BaseException:
            try:
                self.fail_and_retry(trial.number)
            except Exception as exc:  # noqa: BLE001 - unwinding: the next start retries the slot anyway
                log.warning("could not retry trial %d on the way out: %s", trial.number, _first_line(exc))
            raise

    def tell(self, trial: optuna.trial.Trial, value: float) -> bool:
        """Complete ``trial`` with ``value``; False when another worker failed it first (the value is dropped)."""
        frozen = self.study.tell(trial, value, skip_if_finished=True)
        return frozen.state == TrialState.COMPLETE

    # -- workers that are gone -----------------------------------------------------
    def reclaim(self, total: int) -> int:
        """Fail and retry the trials below slot ``total`` whose workers are gone, and retry the slots
        left with no trial waiting, running or complete (a worker died between failing a trial and
        retrying it). Returns how many trials this call retried."""
        if self._optuna_beats:
            fail_stale_trials(self.study)
        trials = self.trials()
        slot_of = slots(trials)
        held: set[int] = set()
        retried = 0
        for t in trials:
            s = slot_of[t.number]
            if t.state == TrialState.RUNNING and s < total and self.is_stale(t):
                if self.fail_and_retry(t.number):
                    retried += 1
                    log.info("trial %d (slot %d) was left running by %s: retried", t.number, s,
                             t.user_attrs.get("worker", "a worker"))
                held.add(s)  # its retry waits (this worker's or the one that failed it first)
            elif t.state in LIVE or t.state == TrialState.COMPLETE:
                held.add(s)
        latest: dict[int, optuna.trial.FrozenTrial] = {}
        for t in trials:
            s = slot_of[t.number]
            if s < total and s not in held and (s not in latest or t.number > latest[s].number):
                latest[s] = t
        for s, t in sorted(latest.items()):
            log.info("slot %d has no live trial (last: trial %d, %s): retried", s, t.number, t.state.name)
            RetryTrial()(self.study, t)
            retried += 1
        return retried

    def is_stale(self, t: optuna.trial.FrozenTrial) -> bool:
        """Whether the RUNNING trial ``t`` has lost its worker.

        Its process on this host no longer exists; or it has beaten no heartbeat for
        ``stale_after_s`` (user attribute ``heartbeat``; on a storage with Optuna's
        heartbeats :func:`fail_stale_trials` judges the trials whose worker is recorded);
        or no worker was recorded ``stale_after_s`` after it started. A trial of this
        worker is never stale.
        """
        worker = t.user_attrs.get("worker", "")
        if worker == self.worker:
            return False
        host, _, pid = worker.rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            return True
        if worker and self._optuna_beats:
            return False
        beat = t.user_attrs.get("heartbeat")
        if beat is None:
            start = t.datetime_start
            beat = start.timestamp() if start is not None else time.time()
        return time.time() - float(beat) > self.stale_after_s

    def fail_and_retry(self, number: int) -> bool:
        """Fail the RUNNING trial ``number`` and retry it; False when it was finished first
        (by its worker, or failed by another worker, which retries it)."""
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self._study_id, number)
        try:
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        RetryTrial()(self.study, self.storage.get_trial(trial_id))
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

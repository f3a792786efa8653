"""1, 2 and 3 worker processes on one search, on each storage; and workers killed in a trial.

For each storage (a journal file, an SQLite file, a throw-away PostgreSQL server from
:mod:`spdy.testing.postgres`) the same search - MiniLM, Algorithm 4 in miniature
(``--evals`` evaluations, seed 0, ``--speedup`` 1.8x), the loss on the first
``--calibration`` documents (the profile and database are the cached default ones, as in
``bench_search.py``) - runs in a fresh study, by 1, 2 and 3 worker processes with one
thread each. A worker does what ``spdy search --evaluate-only --eval-threads 1`` does
(:meth:`spdy.sensitivity.Search.run` on the shared study); the processes load the model
first and start searching together, so that the wall time is the search's. With
``--kill`` two more runs: two workers, the first killed with SIGKILL in the middle of a
trial once ``--kill-after`` trials are complete (the other retries that trial and
finishes); and two workers both killed that way, then one started again (it resumes).

Reported per run: ``search_s`` (from the common start to the last worker's end; for
the runs with kills, to the end of the worker that finished), trials complete, failed
(each failed trial is retried: the reclaimed ones) and skipped, whether every slot
completed exactly once, whether the random phase drew one worker's candidates (the
same loss in every random slot), and the best loss after the random phase and at the
end, the CPU the searching workers got (``cores_used``: their CPU seconds over the wall
time) and the 1-minute load average before and after (other jobs on the machine). Prints
a table; ``--json FILE`` writes the runs with the hardware fingerprint (merged by
storage into FILE if it exists).

    python scripts/bench_workers.py [--storages journal,sqlite,postgresql] [--evals 40] [--calibration 32] \\
        [--kill] [--json scripts/results/bench_workers.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import spdy.kernels  # noqa: F401  - before torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

import optuna  # noqa: E402

from spdy.storage import make_storage, slots  # noqa: E402

COMPLETE, RUNNING, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL


def _worker(url: str, study: str, cfg_kw: dict[str, Any], n_docs: int, ready: Any, go: Any, q: Any) -> None:
    """One worker: set up as ``spdy search --evaluate-only --eval-threads 1`` does, wait for the others, search."""
    import torch
    from bench_search import _setup

    from spdy.kernels import set_num_threads
    from spdy.sensitivity import Search, SearchConfig

    table, obj, _ = _setup(n_docs)
    set_num_threads(1)  # after the setup, which loaded the 2-thread profile's backend
    torch.set_num_threads(1)
    s = Search(table, obj, SearchConfig(**cfg_kw), storage=url, study_name=study)
    ready.wait()
    go.wait()
    t0, cpu0 = time.time(), time.process_time()
    s.run()
    q.put({"pid": mp.current_process().pid, "start": t0, "end": time.time(), "losses_here": obj.calls,
           "cpu_s": time.process_time() - cpu0})


class Run:
    """``n`` workers on a fresh study, started together."""

    def __init__(self, n: int, url: str, study: str, cfg_kw: dict[str, Any], n_docs: int) -> None:
        ctx = mp.get_context("spawn")
        self.q = ctx.Queue()
        ready, go = ctx.Barrier(n + 1), ctx.Barrier(n + 1)
        self.procs = [ctx.Process(target=_worker, args=(url, study, cfg_kw, n_docs, ready, go, self.q)) for _ in range(n)]
        for p in self.procs:
            p.start()
        try:
            ready.wait(timeout=900)
        except threading.BrokenBarrierError:
            for p in self.procs:
                p.kill()
            raise RuntimeError("a worker failed to set up; its traceback is above") from None
        self.t0 = time.time()
        go.wait()

    def finish(self) -> list[dict[str, Any]]:
        """The reports of the workers that were not killed, once they have all ended."""
        expected = sum(p.exitcode != -signal.SIGKILL for p in self.procs)
        out: list[dict[str, Any]] = []
        while len(out) < expected:
            try:
                out.append(self.q.get(timeout=5))
            except queue.Empty:
                bad = [p.exitcode for p in self.procs if p.exitcode not in (None, 0, -signal.SIGKILL)]
                if bad:
                    raise RuntimeError(f"a worker failed (exit codes {bad}); its traceback is above") from None
        for p in self.procs:
            p.join()
        return out


class Storages:
    """Fresh studies on one storage kind: a URL per run, and a look at a study's trials."""

    def __init__(self, kind: str, tmp: Path, postgres: Any) -> None:
        self.kind, self.tmp, self.postgres = kind, tmp, postgres
        self._open: dict[str, Any] = {}

    def url(self, name: str) -> str:
        if self.kind == "journal":
            return str(self.tmp / f"{name}.journal")
        if self.kind == "sqlite":
            return f"sqlite:///{self.tmp / name}.db"
        return self.postgres.create_database(name)

    def trials(self, url: str, study: str) -> list[optuna.trial.FrozenTrial]:
        if url not in self._open:
            self._open[url] = make_storage(url)
        try:
            return optuna.load_study(study_name=study, storage=self._open[url]).get_trials()
        except KeyError:  # not created yet
            return []


def kill_in_a_trial(st: Storages, url: str, study: str, p: Any, after: int) -> int:
    """SIGKILL worker ``p`` just after it started a trial, once ``after`` trials are complete; that trial's number."""
    me = f"{socket.gethostname()}:{p.pid}"
    while True:
        ts = st.trials(url, study)
        if sum(t.state == COMPLETE for t in ts) >= after:
            for t in ts:
                if (t.state == RUNNING and t.user_attrs.get("worker") == me and "slot" in t.user_attrs
                        and t.datetime_start is not None and (datetime.now() - t.datetime_start).total_seconds() < 0.3):
                    time.sleep(0.05)  # past the writes that recorded the trial: in its loss evaluation
                    p.kill()
                    p.join()
                    return t.number
        if p.exitcode is not None:
            raise RuntimeError(f"worker {p.pid} ended (exit {p.exitcode}) before it could be killed")
        time.sleep(0.02)


def summarize(st: Storages, url: str, study: str, total: int, k: int) -> dict[str, Any]:
    ts = st.trials(url, study)
    slot_of = slots(ts)
    done: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for t in ts:
        if t.state == COMPLETE:
            done.setdefault(slot_of[t.number], []).append(t)
    losses = {s: v[0].value for s, v in done.items() if len(v) == 1}
    by_worker: dict[str, int] = {}
    for v in done.values():
        for t in v:
            by_worker[t.user_attrs.get("worker", "?")] = by_worker.get(t.user_attrs.get("worker", "?"), 0) + 1
    return {
        "complete": sum(len(v) for v in done.values()),
        "failed_and_retried": sum(t.state == FAIL for t in ts),
        "skipped": sum("skipped" in t.user_attrs for t in ts),
        "every_slot_once": sorted(done) == list(range(total)) and all(len(v) == 1 for v in done.values()),
        "trials_by_worker": sorted(by_worker.values(), reverse=True),
        "random_losses": [losses.get(s) for s in range(k + 1)],
        "best_random": min((losses[s] for s in range(k + 1) if s in losses), default=None),
        "best": min(losses.values(), default=None),
    }


def run_storage(kind: str, args: argparse.Namespace, n_layers: int, postgres: Any) -> list[dict[str, Any]]:
    from spdy.sensitivity import Schedule, SearchConfig

    cfg_kw = {"speedup": args.speedup, "max_evals": args.evals, "seed": 0, "strategy": "spdy"}
    sched = Schedule.for_config(n_layers, SearchConfig(**cfg_kw))
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        st = Storages(kind, Path(tmp), postgres)
        plan = [("workers", n) for n in (1, 2, 3)] + ([("kill one", 2), ("kill all, start one", 2)] if args.kill else [])
        for what, n in plan:
            study = f"r{len(out)}"
            url = st.url(study)
            load_before = os.getloadavg()[0]
            run = Run(n, url, study, cfg_kw, args.calibration)
            row: dict[str, Any] = {"storage": kind, "run": what, "workers": n, "killed_trials": [],
                                   "load_1min_before": round(load_before, 2)}
            if what == "kill one":
                row["killed_trials"].append(kill_in_a_trial(st, url, study, run.procs[0], args.kill_after))
            elif what == "kill all, start one":
                row["killed_trials"] += [kill_in_a_trial(st, url, study, p, args.kill_after) for p in run.procs]
                row["complete_when_killed"] = sum(t.state == COMPLETE for t in st.trials(url, study))
                row["killed_after_s"] = time.time() - run.t0
                run.finish()
                run = Run(1, url, study, cfg_kw, args.calibration)
            reports = run.finish()
            row["search_s"] = max(r["end"] for r in reports) - run.t0 + row.get("killed_after_s", 0.0)
            row["losses_by_process"] = [r["losses_here"] for r in reports]
            row["cores_used"] = sum(r["cpu_s"] for r in reports) / (max(r["end"] for r in reports) - run.t0)
            row["load_1min_after"] = round(os.getloadavg()[0], 2)
            row.update(summarize(st, url, study, sched.total, sched.k))
            out.append(row)
            print(f"{kind:<10} {what:<20} {n} worker(s): search {row['search_s']:6.1f} s (load {load_before:.1f}, "
                  f"cores used {row['cores_used']:.2f}), "
                  f"complete {row['complete']}, "
                  f"failed+retried {row['failed_and_retried']}, every slot once {row['every_slot_once']}, "
                  f"by worker {row['trials_by_worker']}", flush=True)
    ref = next(r for r in out if r["workers"] == 1)
    for r in out:
        r["random_phase_as_one_worker"] = r["random_losses"] == ref["random_losses"]
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| storage | run | workers | search wall (s) | vs 1 worker | cores used | trials complete | "
             "failed -> retried | every trial once | random phase = 1 worker's | best loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one = next(x for x in rows if x["storage"] == r["storage"] and x["workers"] == 1 and x["run"] == "workers")
        lines.append(f"| {r['storage']} | {r['run']} | {r['workers']} | {r['search_s']:.1f} | "
                     f"{one['search_s'] / r['search_s']:.2f}x | {r.get('cores_used', float('nan')):.2f} | {r['complete']} | "
                     f"{r['failed_and_retried']} | "
                     f"{r['every_slot_once']} | {r['random_phase_as_one_worker']} | {r['best']:.5f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storages", default="journal,sqlite,postgresql")
    ap.add_argument("--evals", type=int, default=40)
    ap.add_argument("--speedup", type=float, default=1.8, help="target (the cached profile reached 1.97x at most)")
    ap.add_argument("--calibration", type=int, default=32, help="calibration documents in the loss")
    ap.add_argument("--kill", action="store_true", help="also the runs with workers killed in a trial")
    ap.add_argument("--kill-after", type=int, default=8, help="complete trials before a worker is killed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from bench_search import _setup

    from spdy.hardware import fingerprint

    n_layers = len(_setup(args.calibration)[0].layers)  # the profile and database, cached before the workers start
    rows: list[dict[str, Any]] = []
    kinds = [s.strip() for s in args.storages.split(",") if s.strip()]
    postgres = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark still stops its server
    if "postgresql" in kinds:
        from spdy.testing.postgres import PostgresServer

        postgres = PostgresServer.start()
    try:
        for kind in kinds:
            rows += run_storage(kind, args, n_layers, postgres)
    finally:
        if postgres is not None:
            postgres.stop()
    print("\n" + table(rows))
    if args.json:
        old = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
        kept = [r for r in old.get("runs", []) if r["storage"] not in kinds]
        settings = {**old.get("settings", {}), **{k: v for k, v in vars(args).items() if k != "json"}}
        write_json(args.json, {"fingerprint": fingerprint(2), "settings": settings, "runs": kept + rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

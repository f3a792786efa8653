"""The SPDY search on MiniLM: strategies against the number of evaluations, and 1 vs 2 workers.

* Strategies: Algorithm 4 (``spdy``, in miniature for the budget), Optuna's TPE and
  CMA-ES over the coefficients, and pure random search; best calibration loss after
  n evaluations, same profile, database, seed and target.
* Workers: the same search (Algorithm 4, ``--worker-evals`` evaluations) run by one
  process, then by two processes (one thread each) sharing a journal-file storage;
  wall time of the search phase, evaluations lost or done twice, whether the random
  phase drew the same candidates as one worker.

The calibration loss uses the first ``--calibration`` documents (default 32, a quarter
of the default set, to keep the comparison affordable on 2 cores); the database and
profile are the default ones (128 documents), from the cache.

    python scripts/bench_search.py [--evals 60] [--worker-evals 40] [--speedup 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import spdy.kernels  # noqa: F401  - before torch

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402


def _setup(n_docs: int) -> tuple[Any, Any, Any]:
    from spdy.stages import CalibrationObjective, ensure_database, ensure_profile
    from spdy.models.base import load_model
    from spdy.profilers import get_backend

    bundle = load_model("minilm")
    profile, _, _ = ensure_profile(bundle, get_backend("spdy-cpu", threads=2))
    db = ensure_database(bundle, grid=profile.table.grid)
    per_batch = len(bundle.calibration[0]["input_ids"])
    small = dataclasses.replace(bundle, calibration=bundle.calibration[: max(1, n_docs // per_batch)])
    return profile.table, CalibrationObjective(small, db, profile.table.layers), bundle


def _worker(store: str, study: str, cfg_kw: dict[str, Any], n_docs: int, threads: int, ready: Any, go: Any,
            q: Any) -> None:
    from spdy.kernels import set_num_threads
    from spdy.sensitivity import Search, SearchConfig

    table, obj, _ = _setup(n_docs)
    # after the setup: loading the spdy-cpu profile sets the backend's 2 threads
    set_num_threads(threads)
    s = Search(table, obj, SearchConfig(**cfg_kw), storage=store, study_name=study)
    ready.wait()  # every worker set up before the clock starts
    go.wait()
    t0 = time.time()
    s.run()
    q.put({"start": t0, "end": time.time(), "evaluations_here": obj.calls, "torch_threads": torch.get_num_threads()})


def run_workers(n: int, store: str, study: str, cfg_kw: dict[str, Any], n_docs: int, threads: int = 1) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ready, go = ctx.Barrier(n + 1), ctx.Barrier(n + 1)
    procs = [ctx.Process(target=_worker, args=(store, study, cfg_kw, n_docs, threads, ready, go, q)) for _ in range(n)]
    for p in procs:
        p.start()
    ready.wait()
    go.wait()
    out: list[dict[str, Any]] = []
    while len(out) < n:
        try:
            out.append(q.get(timeout=5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.terminate()
                raise RuntimeError(f"a search worker failed (exit codes {dead}); its traceback is above")
    for p in procs:
        p.join()
    return {"workers": n, "threads_per_worker": threads,
            "search_wall_s": max(o["end"] for o in out) - min(o["start"] for o in out),
            "evaluations_per_worker": [o["evaluations_here"] for o in out],
            "torch_threads_seen": [o["torch_threads"] for o in out]}


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--evals", type=int, default=60, help="evaluations per strategy")
    ap.add_argument("--strategies", default="spdy,tpe,cmaes,random")
    ap.add_argument("--worker-evals", type=int, default=40, help="evaluations in the 1- vs 2-worker comparison (0: skip)")
    ap.add_argument("--worker-repeats", type=int, default=1,
                    help="repeat the worker comparison; wall times and ratios are medians over the repeats")
    ap.add_argument("--calibration", type=int, default=32, help="calibration documents in the loss")
    ap.add_argument("--full", action="store_true", help="also run Algorithm 4 in full (k=100, delta=0.1: 501 "
                    "evaluations on MiniLM) and report its wall time and per-evaluation breakdown")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def main() -> int:
    args = _args()
    from spdy.hardware import fingerprint
    from spdy.evo import make_search
    from spdy.sensitivity import SearchConfig

    torch.set_num_threads(2)
    table, obj, _ = _setup(args.calibration)
    curves: dict[str, list[float]] = {}
    rows = []
    for strat in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        obj.calls = 0
        t0 = time.perf_counter()
        s = make_search(table, obj, SearchConfig(speedup=args.speedup, max_evals=args.evals, seed=args.seed, strategy=strat))
        res = s.run()
        wall = time.perf_counter() - t0
        losses = [h["loss"] for h in res.history]
        curves[strat] = [float(x) for x in np.minimum.accumulate(losses)]
        rows.append({"strategy": strat, "evaluations": len(losses), "best_loss": res.loss, "wall_s": wall,
                     "best_at": {str(n): curves[strat][min(n, len(losses)) - 1] for n in (10, 20, 40, args.evals)}})
        print(f"{strat:<7} best loss {res.loss:.5f} after {len(losses)} evaluations ({wall:.0f} s)", flush=True)
    full: dict[str, Any] = _full_search(table, obj, args, curves, rows) if args.full else {}
    ns = sorted({10, 20, 40, args.evals})
    print("\n| strategy | " + " | ".join(f"best after {n}" for n in ns) + " |")
    print("|---|" + "---|" * len(ns))
    for strat, c in curves.items():
        print(f"| {strat} | " + " | ".join(f"{c[min(n, len(c)) - 1]:.5f}" for n in ns) + " |")
    del obj
    workers, check = _compare_workers(table, args) if args.worker_evals else ([], {})
    write_json(args.json, {"fingerprint": fingerprint(2), "settings": vars(args), "strategies": rows, "full": full,
                           "curves": curves, "workers": workers, "workers_check": check})
    return 0


def _full_search(table: Any, obj: Any, args: argparse.Namespace, curves: dict[str, list[float]],
                 rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Algorithm 4 in full: its wall time and per-evaluation breakdown (its curve and row added)."""
    from spdy.sensitivity import Search, SearchConfig

    obj.calls, obj.stitch_s, obj.loss_s = 0, 0.0, 0.0
    t0 = time.perf_counter()
    s = Search(table, obj, SearchConfig(speedup=args.speedup, seed=args.seed, strategy="spdy"))
    res = s.run()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in res.history]
    curves["spdy-full"] = [float(x) for x in np.minimum.accumulate(losses)]
    n = max(1, obj.calls)
    full = {"evaluations": len(losses), "k": s.schedule.k, "d_max": s.schedule.d_max, "wall_s": wall,
            "best_loss": res.loss, "loss_calls": obj.calls,
            "per_evaluation_ms": {"dp": s.stage_s["dp"] / len(losses) * 1e3, "stitch": obj.stitch_s / n * 1e3,
                                  "loss": obj.loss_s / n * 1e3},
            "best_after_random_phase": curves["spdy-full"][s.schedule.k]}
    rows.append({"strategy": "spdy-full", "evaluations": len(losses), "best_loss": res.loss, "wall_s": wall,
                 "best_at": {str(m): curves["spdy-full"][min(m, len(losses)) - 1] for m in (10, 20, 40, args.evals, 101, len(losses))}})
    print(f"Algorithm 4 in full: {len(losses)} evaluations in {wall:.0f} s, best loss {res.loss:.5f}; "
          f"per evaluation {full['per_evaluation_ms']}", flush=True)
    return full


def _compare_workers(table: Any, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """1 worker x 1 thread against 2 workers x 1 thread (and 1 worker x 2 threads), repeated: the runs and the check."""
    cfg_kw = {"speedup": args.speedup, "max_evals": args.worker_evals, "seed": args.seed, "strategy": "spdy"}
    workers: list[dict[str, Any]] = []
    walls: list[list[float]] = []
    checks: list[dict[str, Any]] = []
    for rep in range(max(1, args.worker_repeats)):
        # 1 worker x 1 thread, 2 workers x 1 thread (the comparison asked for), and for
        # reference 1 worker x 2 threads (the same 2 cores used by torch's intra-op threads)
        with tempfile.TemporaryDirectory() as tmp:
            walls.append([])
            for n, th in ((1, 1), (2, 1), (1, 2)):
                store = str(Path(tmp) / (f"w{n}.journal" if th == 1 else f"w{n}t{th}.journal"))
                r = run_workers(n, store, "bench", cfg_kw, args.calibration, threads=th)
                r["repeat"] = rep
                workers.append(r)
                walls[-1].append(r["search_wall_s"])
                print(f"[{rep}] {n} worker(s) x {th} thread(s): search wall {r['search_wall_s']:.1f} s, evaluations "
                      f"per worker {r['evaluations_per_worker']}, torch threads {r['torch_threads_seen']}", flush=True)
            checks.append(_check_workers(tmp, table, cfg_kw, args.worker_evals))
    w = np.array(walls)
    check = dict(checks[-1])
    check.update({
        "every_repeat_unique_and_complete": all(c["numbers_unique_and_complete"] for c in checks),
        "every_repeat_random_phase_identical": all(c["random_phase_identical"] for c in checks),
        "repeats": len(walls),
        "search_wall_s_median": {"1x1": float(np.median(w[:, 0])), "2x1": float(np.median(w[:, 1])),
                                 "1x2": float(np.median(w[:, 2]))},
        "speedup_2_over_1": float(np.median(w[:, 0] / w[:, 1])),
        "speedup_2_over_1x2threads": float(np.median(w[:, 2] / w[:, 1])),
    })
    print(check)
    return workers, check


def _check_workers(tmp: str, table: Any, cfg_kw: dict[str, Any], n_evals: int) -> dict[str, Any]:
    """In one repeat's storages: no trial lost or done twice, the random phase as one worker's, the bests."""
    import optuna

    from spdy.sensitivity import Schedule, SearchConfig, make_storage

    h = {}
    for n in (1, 2):
        st = optuna.load_study(study_name="bench", storage=make_storage(str(Path(tmp) / f"w{n}.journal")))
        done = [t for t in st.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        h[n] = {t.number: t for t in done}
    sched = Schedule.for_config(len(table.layers), SearchConfig(**cfg_kw))
    return {
        "evaluations_1": len(h[1]), "evaluations_2": len(h[2]),
        "numbers_unique_and_complete": sorted(h[2]) == list(range(n_evals)),
        "random_phase_identical": all(h[1][i].user_attrs["c"] == h[2][i].user_attrs["c"]
                                      for i in range(min(sched.k + 1, n_evals))),
        "best_1": min(t.value for t in h[1].values()), "best_2": min(t.value for t in h[2].values()),
    }


if __name__ == "__main__":
    sys.exit(main())

"""Two threads at two speeds: ONNX Runtime's dense MiniLM on one thread (pinned to each CPU) and on two, cycle by cycle, with spdy's models.

On these 2-vCPU machines a two-thread run switches, within seconds and for seconds, between a
fast state and one where everything on two threads is 17-30% slower, while one thread on either
CPU keeps its speed: the two CPUs then slow each other down (as two hyperthreads of one core
would). This times, in each of ``--cycles`` cycles: ONNX Runtime's dense model (the searches'
runner: exported, graph optimisations on) with one thread pinned to the first CPU, then to the
second, then with two threads; then spdy's dense plan and a uniformly pruned model of
``--profile`` (the grid level nearest ``--sparsity``, each layer in the profile's format), one
call each in turn. Each cycle's state is read from ONNX Runtime's gain from the second thread
(one-thread time over two-thread time): cycles split at the widest gap between gains when it is
wider than ``--gap``. Prints each state's medians (and the speedups of the pruned model over
ONNX Runtime and over the dense plan), and ``--json`` writes every cycle with the hardware
fingerprint.

    spdy profile --model minilm --backend spdy-cpu -o profile.json
    python scripts/bench_thread_state.py --profile profile.json --cycles 80 --json scripts/results/bench_thread_state.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import spdy.profilers  # noqa: F401  - before torch: one OpenMP runtime for torch and Numba

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import block_ms, write_json  # noqa: E402

from spdy.hardware import fingerprint  # noqa: E402
from spdy.models.base import load_model  # noqa: E402
from spdy.profile import load_profile  # noqa: E402
from spdy.profilers import get_backend  # noqa: E402
from spdy.profilers.dense_runtimes import ONNXRUNTIME, dense_runtimes  # noqa: E402
from spdy.profilers.ort_cpu import OrtCpuBackend  # noqa: E402
from spdy.profilers.profiler import level_plans  # noqa: E402
from spdy.results import split_states  # noqa: E402

#: the columns of a cycle, in the order they are timed
COLUMNS = ("ort_1t_cpu_a", "ort_1t_cpu_b", "ort_2t", "dense_plan", "pruned")


def interleaved_ms(fns: Sequence[Callable[[], Any]], calls: int) -> list[float]:
    """Median milliseconds per call of each of ``fns``, called one after the other ``calls`` times."""
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(calls):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in ts]


def state_rows(cycles: Sequence[dict[str, float]], states: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per state, the median of each column, the gain from the second thread and the pruned model's
    speedups (medians of the cycles' ratios)."""
    out = {}
    for label, which in (("fast", 1), ("slow", 0)):
        rows = [c for c, s in zip(cycles, states) if s == which]
        if not rows:
            continue
        med = {c: statistics.median(r[c] for r in rows) for c in COLUMNS}
        med["cycles"] = len(rows)
        med["gain_2t"] = statistics.median(r["gain_2t"] for r in rows)
        med["pruned_over_ort_2t"] = statistics.median(r["ort_2t"] / r["pruned"] for r in rows)
        med["pruned_over_dense_plan"] = statistics.median(r["dense_plan"] / r["pruned"] for r in rows)
        med["ort_2t_over_dense_plan"] = statistics.median(r["ort_2t"] / r["dense_plan"] for r in rows)
        out[label] = med
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="a MiniLM profile on 2 threads written by 'spdy profile -o'")
    ap.add_argument("--sparsity", type=float, default=0.9, help="the pruned model's uniform sparsity (default 0.9)")
    ap.add_argument("--cycles", type=int, default=60, help="cycles (default 60)")
    ap.add_argument("--calls", type=int, default=8, help="two-thread calls per block (default 8)")
    ap.add_argument("--gap", type=float, default=0.15, help="the least gap in gains that splits two states")
    ap.add_argument("--json", help="write the cycles here")
    args = ap.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit(f"this needs two CPUs; this process may use {cpus}")
    bundle = load_model("minilm")
    profile = load_profile(args.profile, specs=bundle.inference_layers())
    threads = int(profile.settings["threads"])
    if threads != 2:
        raise SystemExit(f"{args.profile} was measured on {threads} threads; this compares one thread with two")
    backend = get_backend(profile.backend, threads=2)
    inference = bundle.inference
    t = profile.table
    level = int(np.argmin(np.abs(np.asarray(t.grid.levels) - args.sparsity)))
    dense, pruned = level_plans(profile, bundle, np.array([np.zeros(len(t.layers)), np.full(len(t.layers), level)],
                                                          dtype=np.int64))
    runtimes = dense_runtimes(backend, inference, state_probe=False)
    if ONNXRUNTIME not in runtimes.runtimes:
        raise SystemExit(f"ONNX Runtime is not available here: {runtimes.unavailable.get(ONNXRUNTIME)}")
    ort2 = runtimes.runtimes[ONNXRUNTIME].runner
    ort1 = OrtCpuBackend(threads=1, shared_pool=False).dense_runner(inference)
    spdy_runners = [backend.model_runner(inference, dense), backend.model_runner(inference, pruned)]
    for fn in (ort1, ort2, *spdy_runners):
        fn()
        fn()
    one_calls = max(2, args.calls // 2)
    print(f"{args.cycles} cycles: ONNX Runtime 1 thread on CPU {cpus[0]} and {cpus[1]} ({one_calls} calls each), "
          f"2 threads ({args.calls} calls), spdy's dense plan and the {float(t.grid.levels[level]):.0%} model "
          f"({args.calls} calls each)")
    cycles = []
    for i in range(args.cycles):
        row: dict[str, float] = {}
        for col, cpu in (("ort_1t_cpu_a", cpus[0]), ("ort_1t_cpu_b", cpus[1])):
            os.sched_setaffinity(0, {cpu})
            row[col] = block_ms(ort1, one_calls)
        os.sched_setaffinity(0, set(cpus))
        time.sleep(backend.pool_rest_s)
        row["ort_2t"] = block_ms(ort2, args.calls)
        time.sleep(backend.pool_rest_s)
        row["dense_plan"], row["pruned"] = interleaved_ms(spdy_runners, args.calls)
        row["gain_2t"] = statistics.median([row["ort_1t_cpu_a"], row["ort_1t_cpu_b"]]) / row["ort_2t"]
        cycles.append(row)
        print(f"cycle {i:3d}: ORT 1t {row['ort_1t_cpu_a']:.1f} / {row['ort_1t_cpu_b']:.1f} ms, 2t {row['ort_2t']:.1f} ms "
              f"(gain {row['gain_2t']:.2f}); dense plan {row['dense_plan']:.2f}, pruned {row['pruned']:.2f} ms",
              flush=True)
    states = split_states([c["gain_2t"] for c in cycles], args.gap)
    by_state = state_rows(cycles, states)
    print()
    print("| state | cycles | ORT 1t CPU a / b ms | ORT 2t ms | gain from 2nd thread | dense plan ms | pruned ms | "
          "pruned over ORT 2t | pruned over dense plan | ORT 2t / dense plan |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, m in by_state.items():
        print(f"| {label} | {m['cycles']} | {m['ort_1t_cpu_a']:.1f} / {m['ort_1t_cpu_b']:.1f} | {m['ort_2t']:.2f} | "
              f"{m['gain_2t']:.2f}x | {m['dense_plan']:.2f} | {m['pruned']:.2f} | {m['pruned_over_ort_2t']:.3f}x | "
              f"{m['pruned_over_dense_plan']:.3f}x | {m['ort_2t_over_dense_plan']:.3f} |")
    if len(by_state) == 2:
        f, s = by_state["fast"], by_state["slow"]
        print(f"slow over fast: ORT 1t {s['ort_1t_cpu_a'] / f['ort_1t_cpu_a']:.3f} / "
              f"{s['ort_1t_cpu_b'] / f['ort_1t_cpu_b']:.3f}, ORT 2t {s['ort_2t'] / f['ort_2t']:.3f}, dense plan "
              f"{s['dense_plan'] / f['dense_plan']:.3f}, pruned {s['pruned'] / f['pruned']:.3f}; the pruned model's "
              f"speedup over ORT 2t {s['pruned_over_ort_2t'] / f['pruned_over_ort_2t']:.3f}")
    else:
        print("one state in these cycles (no gap in the gains wider than --gap)")
    write_json(args.json, {"fingerprint": fingerprint(), "profile": args.profile, "cpus": cpus[:2],
                           "sparsity": float(t.grid.levels[level]), "calls": args.calls, "gap": args.gap,
                           "cycles": cycles, "states": states, "by_state": by_state})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

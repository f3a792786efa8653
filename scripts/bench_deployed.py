"""Pruned models as deployed (``spdy.apply(..., sparse=True)``) against the dense runtimes, 1 and 2 threads.

For each search result given (``--result LABEL=OUT``, the ``-o`` folder of ``spdy search``) the
model is loaded as a user deploys it: the pruned weights into a fresh MiniLM, the layers swapped
for spdy's sparse modules in the formats the profile chose, attention and GELU on spdy's kernels
where the result was timed so. Per thread count, the dense model in torch eager and in ONNX
Runtime (exported, graph optimisations on, the same thread count) and every deployed model are
timed on the search's example batch (one sequence of 128 tokens) in blocks of ``calls`` calls,
the blocks' order rotating from round to round (ONNX Runtime's thread pool never runs call by
call between the others'); each speedup is the median over rounds of that round's ratio. The
thread counts take turns round by round, so each round also gives every model's gain from the
second thread; two threads on these machines run in a fast or a slow state (the two CPUs slowing
each other, ``bench_thread_state.py``), and the gains are also given per state, read from ONNX
Runtime's gain in the round.
``--dense-plan`` adds the dense model in spdy's runtime ("spdy dense"): every prunable Linear
in the ``dnnl`` format (its weight packed once for oneDNN), attention and GELU on spdy's kernels;
``--dense-format`` times it with another format for every Linear instead (e.g. ``bcsr4x1``, spdy's
blocked kernel on the full weight, which runs the query, key and value as one call and the
feed-forward and attention output fused, as a profile's dense plan may).
``--compile`` adds the dense model compiled by ``torch.compile`` (Inductor's C++ backend, static
shapes; compiled once per thread count, with that many OpenMP threads), the third dense runtime
``spdy search --reference fastest`` weighs; "vs fastest" is then over the fastest of the three.

    python scripts/bench_deployed.py --result 2x=out/2x --result 2.5x=out/2.5x --json scripts/results/bench_deployed.json
    python scripts/bench_deployed.py --dense-plan --json scripts/results/bench_dense_plan.json
    python scripts/bench_deployed.py --dense-plan --compile --result 2.5x=out/2.5x --rounds 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spdy.kernels as K  # noqa: E402  (first: one OpenMP runtime for torch and Numba)

import torch  # noqa: E402
from _common import write_json  # noqa: E402

import spdy  # noqa: E402
from spdy.hardware import fingerprint  # noqa: E402

PAUSE_S = 0.2


def blocks(fns: dict[str, Callable[[], Any]], rounds: int, calls: int, start: int = 0) -> dict[str, list[float]]:
    """Per round, each fn's median seconds per call over a block of ``calls`` calls; the
    blocks' order rotates from round to round (round ``start`` first)."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(start, start + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            time.sleep(PAUSE_S)  # lets the previous pool's workers go idle
            fns[n]()
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fns[n]()
                ts.append(time.perf_counter() - t0)
            out[n].append(statistics.median(ts))
    return out


def scaling_by_state(times: dict[int, dict[str, list[float]]], lo: int, hi: int, gap: float
                     ) -> tuple[list[int], dict[str, dict[str, Any]]]:
    """Each round's state from ONNX Runtime's gain from ``lo`` to ``hi`` threads in that round
    (:func:`spdy.results.split_states`), and per state, each model's gain (its ``lo``-thread time over
    its ``hi``-thread time, the median over the state's rounds) and the rounds counted."""
    from spdy.results import split_states

    gains = [a / b for a, b in zip(times[lo]["ONNX Runtime"], times[hi]["ONNX Runtime"])]
    states = split_states(gains, gap)
    out: dict[str, dict[str, Any]] = {}
    for label, which in (("fast", 1), ("slow", 0)):
        idx = [i for i, s in enumerate(states) if s == which]
        if idx:
            out[label] = {"rounds": len(idx), **{name: statistics.median(times[lo][name][i] / times[hi][name][i]
                                                                         for i in idx) for name in times[hi]}}
    return states, out


def compiled_dense(model: torch.nn.Module, ex: Any, fwd: Callable[[Any, Any], Any], threads: int
                   ) -> Callable[[], Any]:
    """``model`` compiled by ``torch.compile`` for ``threads`` threads (Inductor bakes the thread count
    into its C++ kernels: one compilation per count, each its own cache entry), compiled here."""
    K.set_num_threads(threads)
    compiled = torch.compile(model, dynamic=False, options={"cpp.threads": threads})

    def run() -> Any:
        return fwd(compiled, ex)

    with torch.inference_mode():
        run()
    return run


def dense_plan(model: torch.nn.Module, layers: list[str], fmt: str = "dnnl") -> torch.nn.Module:
    """``model`` unpruned in spdy's runtime: the ``layers`` as SparseLinears in format ``fmt``
    (default ``dnnl``), the rest on :func:`spdy.runtime.fast_base`."""
    from spdy import runtime

    runtime.swap_modules(model, {n: runtime.SparseLinear.from_linear(model.get_submodule(n), format=fmt).eval()
                                 for n in layers})
    runtime.fast_base(model)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", action="append", default=[], metavar="LABEL=OUT",
                    help="a search result folder (spdy search -o OUT) and its label; repeatable")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--dense-plan", action="store_true",
                    help="also time the dense model in spdy's runtime (dnnl Linears, spdy's attention and GELU)")
    ap.add_argument("--dense-format", default="dnnl",
                    help="the Linears' format in --dense-plan (default dnnl; e.g. bcsr4x1, csr)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the dense model compiled by torch.compile (Inductor C++), per thread count")
    ap.add_argument("--gap", type=float, default=0.15,
                    help="the least gap in ONNX Runtime's per-round gains from the second thread that splits the "
                         "rounds into a fast and a slow state (default 0.15)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    results = []
    for item in args.result:
        label, sep, path = item.partition("=")
        if not sep or not Path(path, "result.json").is_file():
            ap.error(f"--result takes LABEL=OUT with OUT a spdy search output folder (OUT/result.json); got {item!r}")
        results.append((label, path))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from spdy.models.base import load_model
    from spdy.models.minilm import load_encoder
    from spdy.profilers.ort_cpu import OrtCpuBackend

    bundle = load_model("minilm", n_calibration=1)
    ex, fwd = bundle.example, bundle.forward
    dense = bundle.model.eval()
    models = {}
    for label, path in results:
        m, _ = load_encoder()
        models[label] = spdy.apply(m, path, sparse=True, threads=max(args.threads)).eval()
    if args.dense_plan:
        models["spdy dense"] = dense_plan(load_encoder()[0], [s.name for s in bundle.layers()], args.dense_format)
    rows = []
    fns: dict[int, dict[str, Callable[[], Any]]] = {}
    for threads in args.threads:
        ort = OrtCpuBackend(threads=threads, shared_pool=False).dense_runner(bundle)
        fns[threads] = {"torch eager": lambda: fwd(dense, ex), "ONNX Runtime": ort}
        if args.compile:
            fns[threads]["torch.compile"] = compiled_dense(dense, ex, fwd, threads)
        fns[threads].update({label: (lambda m=m: fwd(m, ex)) for label, m in models.items()})
    times: dict[int, dict[str, list[float]]] = {t: {n: [] for n in fns[t]} for t in args.threads}
    with torch.inference_mode():
        want = fwd(dense, ex)
        diffs = {label: float((fwd(m, ex) - want).abs().max()) for label, m in models.items()}
        for threads in args.threads:
            K.set_num_threads(threads)
            for f in fns[threads].values():  # warm-up
                f()
                f()
        for r in range(args.rounds):  # the thread counts take turns round by round, the first alternating
            for threads in (args.threads if r % 2 == 0 else args.threads[::-1]):
                K.set_num_threads(threads)
                for name, ts in blocks(fns[threads], 1, args.calls, start=r).items():
                    times[threads][name] += ts
    for threads in args.threads:
        got = times[threads]
        dense_names = [n for n in ("torch eager", "ONNX Runtime", "torch.compile") if n in got]
        fastest = [min(ts) for ts in zip(*(got[n] for n in dense_names))]
        for name, ts in got.items():
            rows.append({"threads": threads, "model": name, "median_ms": statistics.median(ts) * 1e3,
                         "vs_torch": statistics.median(t / s for t, s in zip(got["torch eager"], ts)),
                         "vs_ort": statistics.median(o / s for o, s in zip(got["ONNX Runtime"], ts)),
                         "vs_fastest": statistics.median(f / s for f, s in zip(fastest, ts)),
                         "rounds_ms": [t * 1e3 for t in ts]})
    print(f"{'model':<14} {'threads':>7} {'ms':>8} {'vs torch':>9} {'vs ORT':>7} {'vs fastest':>10}   (medians of "
          f"{args.rounds} rounds; speedups: median of per-round ratios)")
    for r in rows:
        print(f"{r['model']:<14} {r['threads']:>7} {r['median_ms']:>8.2f} {r['vs_torch']:>8.2f}x {r['vs_ort']:>6.2f}x "
              f"{r['vs_fastest']:>9.2f}x")
    states: list[int] = []
    by_state: dict[str, dict[str, Any]] = {}
    if len(args.threads) > 1:
        lo, hi = min(args.threads), max(args.threads)
        states, by_state = scaling_by_state(times, lo, hi, args.gap)
        head = "  ".join(f"{label} state ({m['rounds']} rounds)" for label, m in by_state.items())
        print(f"{hi} threads over {lo}: all rounds (median of the per-round ratios)  {head}")
        for name in times[hi]:
            every = statistics.median(a / b for a, b in zip(times[lo][name], times[hi][name]))
            print(f"  {name:<14} {every:.2f}x  " + "  ".join(f"{m[name]:.2f}x" for m in by_state.values()))
        if len(by_state) == 1:
            print(f"  (one state: ONNX Runtime's gains from the {hi}th thread, round by round, show no gap wider "
                  f"than {args.gap})")
    print("max |output - dense|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    write_json(args.json, {"schema": "spdy.bench_deployed", "schema_version": 1,
                           "fingerprint": fingerprint(extra={"openmp": K.openmp_status()}),
                           "settings": {**vars(args), "results": dict(results)}, "max_abs_diff": diffs, "records": rows,
                           "states": states, "scaling_by_state": by_state})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

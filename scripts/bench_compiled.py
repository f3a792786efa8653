"""Eager against compiled: the same pruned models in spdy's eager runtime and under torch.compile.

``--model``: MiniLM (default, 1 x 128 tokens) or a ``package.module:factory`` (in the
inference form spdy times: BatchNorms folded). For each sparsity of ``--levels`` every
prunable layer is magnitude-pruned to it, in the kernel format ``auto`` picks for it
(:func:`spdy.kernels.choose_format`, :func:`~spdy.kernels.choose_conv_format`; the same
format in both runtimes); level 0 is the dense plan (torch's own Linear layers; ``0 dnnl`` the same with oneDNN-packed
weights, the ``dnnl`` format). Each model runs in

* ``eager``: the ``spdy-cpu`` backend's model (spdy's sparse modules in eager torch);
* ``compiled``: the ``spdy-cpu-compiled`` backend's (the rest of the model compiled by
  Inductor's C++ backend, each sparse layer one ``spdy::call`` op),

and the base (every prunable layer a stand-in) in both. All of them and the dense runtimes of
torch's pool (torch eager; torch.compile, the whole model in one graph, no slots; for a CNN
torch eager in channels_last) are timed interleaved call by
call, round by round, ONNX Runtime dense in a block of its own next to them (its own thread
pool, as :mod:`spdy.profilers.dense_runtimes` times it). Every number printed is a median
over rounds of a ratio taken within one round. ``--json FILE`` writes them with the hardware
fingerprint.

    python scripts/bench_compiled.py --threads 2 [--model M] [--levels 0 0.5 0.7 0.9 0.95] [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spdy.profilers  # noqa: E402,F401  - the kernels before torch: one OpenMP runtime

import numpy as np  # noqa: E402

from _common import write_json  # noqa: E402
from spdy import kernels  # noqa: E402
from spdy.models.minilm import load_minilm  # noqa: E402
from spdy.profilers import STANDIN, LayerChoice, get_backend  # noqa: E402
from spdy.profilers.dense_runtimes import LABELS, ONNXRUNTIME, RUNTIMES, TORCH, _time_apart, dense_runtimes  # noqa: E402
from spdy.profilers.pruning import LevelPruner  # noqa: E402
from spdy.stages import as_bundle  # noqa: E402


def uniform_plan(bundle: object, level: float, dense_format: str = "dense") -> dict[str, LayerChoice]:
    """Every prunable layer magnitude-pruned to ``level`` in the format ``auto`` picks (at 0:
    ``dense_format`` for Linear layers, ``dense`` for convolutions)."""
    plan = {}
    for spec in bundle.layers():  # type: ignore[attr-defined]
        mod = bundle.model.get_submodule(spec.name)  # type: ignore[attr-defined]
        w = mod.weight.detach().numpy().astype(np.float32)
        b = None if mod.bias is None else mod.bias.detach().numpy().astype(np.float32)
        wp = LevelPruner(w).at(level) if level > 0 else w
        if spec.kind == "linear":
            fmt = kernels.choose_format(wp, tokens=int(np.prod(spec.input_shape[:-1]))) if level > 0 else dense_format
        else:
            fmt = kernels.choose_conv_format(wp, getattr(mod, "groups", 1)) if level > 0 else "dense"
        plan[spec.name] = LayerChoice(fmt, wp, b, level)
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="minilm (8 calibration documents: timing only) or "
                    "package.module:factory, e.g. spdy.examples.efficientnet_lite:factory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9, 0.95])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if any(not 0 <= s < 1 for s in args.levels):
        ap.error(f"--levels must lie in [0, 1); got {args.levels}")
    bundle = (load_minilm(n_calibration=8) if args.model == "minilm" else as_bundle(args.model)).inference
    eager = get_backend("spdy-cpu", threads=args.threads)
    compiled = get_backend("spdy-cpu-compiled", threads=args.threads)
    names = [s.name for s in bundle.layers()]
    plans = {f"{s:g}": uniform_plan(bundle, s) for s in args.levels}
    if kernels.DNNL and 0.0 in args.levels:
        plans["0 dnnl"] = uniform_plan(bundle, 0.0, "dnnl")  # the dense plan with oneDNN-packed weights
    plans["base"] = {n: LayerChoice(STANDIN) for n in names}
    t0 = time.perf_counter()
    compiled_runs = [compiled.model_runner(bundle, p) for p in plans.values()]  # compiles once, here
    print(f"compiled in {time.perf_counter() - t0:.1f} s (the first runner; the others reuse its graph)", flush=True)
    runtimes = dense_runtimes(eager, bundle, state_probe=False)
    keys = list(plans)
    got: dict[str, dict[str, list[float]]] = {k: {"eager": [], "compiled": []} for k in keys}
    dense: dict[str, list[float]] = {rt: [] for rt in RUNTIMES if rt in runtimes.runtimes}
    eager_runs = [eager.model_runner(bundle, p) for p in plans.values()]
    same = [rt for rt in runtimes.runtimes.values() if rt.timer is None]  # torch eager: this pool
    apart = [rt for rt in runtimes.runtimes.values() if rt.timer is not None]  # ONNX Runtime: its own
    n = len(keys)
    for r in range(args.rounds):
        if r % 2:
            ort = _time_apart(eager, apart)
        # eager and compiled models (and torch eager dense) interleaved call by call
        timed = eager.measure(eager_runs + compiled_runs + [rt.runner for rt in same], policy=eager.policy.for_models())
        if not r % 2:
            ort = _time_apart(eager, apart)
        for i, k in enumerate(keys):
            got[k]["eager"].append(timed[i].median_s)
            got[k]["compiled"].append(timed[n + i].median_s)
        for rt, t in zip(same, timed[2 * n:]):
            dense[rt.name].append(t.median_s)
        for name, t in ort.items():
            dense[name].append(t.median_s)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {got[k]['eager'][-1] * 1e3:.2f}/{got[k]['compiled'][-1] * 1e3:.2f} ms" for k in keys), flush=True)

    def med(xs: list[float]) -> float:
        return statistics.median(xs) if xs else math.nan

    def ratio(a: list[float], b: list[float]) -> float:
        return med([x / y for x, y in zip(a, b)]) if a and b else math.nan

    ref = dense[ONNXRUNTIME] if dense[ONNXRUNTIME] else dense[TORCH]
    ref_name = ONNXRUNTIME if dense[ONNXRUNTIME] else TORCH
    print(f"\n{bundle.name}, {args.threads} thread(s), median of {args.rounds} rounds; dense: "
          + ", ".join(f"{LABELS[rt]} {med(v) * 1e3:.2f} ms" for rt, v in dense.items()))
    print(f"{'model':<8} {'eager ms':>9} {'compiled ms':>12} {'compiled/eager':>15} "
          f"{'eager over ' + ref_name:>24} {'compiled over ' + ref_name:>27}")
    rows = {}
    for k in keys:
        e, c = got[k]["eager"], got[k]["compiled"]
        rows[k] = {"eager_ms": med(e) * 1e3, "compiled_ms": med(c) * 1e3, "compiled_over_eager": ratio(c, e),
                   "eager_speedup": ratio(ref, e), "compiled_speedup": ratio(ref, c),
                   "eager_over_torch": ratio(dense[TORCH], e), "compiled_over_torch": ratio(dense[TORCH], c)}
        x = rows[k]
        print(f"{k:<8} {x['eager_ms']:>9.2f} {x['compiled_ms']:>12.2f} {x['compiled_over_eager']:>15.3f} "
              f"{x['eager_speedup']:>23.2f}x {x['compiled_speedup']:>26.2f}x")
    write_json(str(args.json) if args.json else None, {
        "fingerprint": compiled.fingerprint(), "model": bundle.name, "threads": args.threads, "rounds": args.rounds,
        "levels": args.levels, "reference": ref_name, "rows": rows, "samples": got,
        "dense": dense, "unavailable": dict(runtimes.unavailable), "policy": eager.policy.to_json()})


if __name__ == "__main__":
    main()

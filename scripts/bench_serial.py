"""Serial against multi-threaded sparse kernels inside the model, timed side by side.

For each ``--targets`` speedup, MiniLM pruned uniformly to that predicted speedup in
the ``--profile`` (a spdy-cpu profile on more than one thread), three times: with the
kernel formats the profile chose, with every sparse layer in its serial twin (``csr``
-> ``csr-1t``, ...) and with every sparse layer in its multi-threaded twin. All of
them, the dense plan and the base run interleaved, round by round (``--rounds``), in
one process, so each round's speedups over the dense plan compare the three at the same
moment of the machine. Prints the median speedup and its 10th-90th percentile over the
rounds, and each round's multi-threaded over serial time; ``--json FILE`` writes them
with the hardware fingerprint.

    python scripts/bench_serial.py --profile PROFILE.json [--targets 1.5,2,2.5] [--rounds 12] \\
        [--json scripts/results/bench_serial.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import spdy.kernels  # noqa: F401  - before torch: one OpenMP runtime
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

from spdy.api import as_bundle
from spdy.baselines import uniform
from spdy.profile import load_profile
from spdy.profilers import STANDIN, LayerChoice, backend_plan, get_backend
from spdy.profilers.base import DENSE, SERIAL_SUFFIX
from spdy.profilers.profiler import _weight_bias
from spdy.profilers.pruning import LevelPruner


def variants(profile, target: float) -> dict[str, object]:
    """The uniform solution for ``target`` with the profile's formats, all serial, all multi-threaded."""
    sol = uniform(profile.table, target)
    fm = sol.formats
    serial = tuple(f if f == DENSE or f.endswith(SERIAL_SUFFIX) else f + SERIAL_SUFFIX for f in fm)
    parallel = tuple(f.removesuffix(SERIAL_SUFFIX) for f in fm)
    return {"profile": sol, "serial": dataclasses.replace(sol, formats=serial),
            "parallel": dataclasses.replace(sol, formats=parallel)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="a spdy-cpu MiniLM profile made on more than one thread")
    ap.add_argument("--targets", default="1.5,2,2.5", help="predicted speedups of the uniform models")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    profile = load_profile(args.profile)
    threads = int(profile.settings.get("threads", 2))
    bundle = as_bundle("minilm").inference
    backend = get_backend("spdy-cpu", threads=threads)
    table = profile.table
    sols: dict[str, object] = {}
    serial_in_profile: dict[str, int] = {}
    for t in (float(x) for x in args.targets.split(",")):
        for kind, sol in variants(profile, t).items():
            sols[f"{t:g}x {kind}"] = sol
        serial_in_profile[f"{t:g}x"] = sum(f.endswith(SERIAL_SUFFIX) for f in sols[f"{t:g}x profile"].formats)
    pruners: dict[str, LevelPruner] = {}

    def weight(name: str, choice) -> np.ndarray:
        if name not in pruners:
            pruners[name] = LevelPruner(_weight_bias(bundle, name)[0])
        return pruners[name].at(choice.sparsity)

    names = list(sols)
    dense = table.solution(np.zeros(len(table.layers), dtype=np.int64))
    plans = [backend_plan(s, weight, bundle.model) for s in (dense, *(sols[n] for n in names))]
    plans.append({n: LayerChoice(STANDIN) for n in table.layers})
    t0 = time.time()
    rows = []
    for i in range(args.rounds):
        rows.append([tm.median_s for tm in backend.time_models(bundle, plans)])
        print(f"round {i + 1}/{args.rounds}: dense plan {rows[-1][0] * 1e3:.2f} ms", flush=True)
    arr = np.array(rows)
    out = {"fingerprint": backend.fingerprint(), "profile": str(args.profile),
           "rounds": args.rounds, "seconds": round(time.time() - t0, 1), "dense_plan_ms": (arr[:, 0] * 1e3).tolist(),
           "serial_layers_in_profile": serial_in_profile, "layers": len(table.layers), "models": {}}
    print(f"\n{'model':<16} {'predicted':>9} {'measured':>9} {'p10-p90':>12} {'ms':>7}")
    for k, n in enumerate(names):
        sp = arr[:, 0] / arr[:, 1 + k]
        m = {"predicted_speedup": float(sols[n].predicted_speedup), "speedup_median": float(np.median(sp)),
             "p10": float(np.percentile(sp, 10)), "p90": float(np.percentile(sp, 90)),
             "ms_median": float(np.median(arr[:, 1 + k]) * 1e3), "speedups": sp.tolist()}
        out["models"][n] = m
        print(f"{n:<16} {m['predicted_speedup']:>8.2f}x {m['speedup_median']:>8.3f}x "
              f"{m['p10']:>5.2f}-{m['p90']:<5.2f} {m['ms_median']:>7.2f}")
    print()
    for t in serial_in_profile:
        q = arr[:, 1 + names.index(f"{t} parallel")] / arr[:, 1 + names.index(f"{t} serial")]
        out["models"][f"{t} parallel"]["over_serial"] = q.tolist()
        print(f"{t}: {serial_in_profile[t]}/{len(table.layers)} layers serial in the profile; multi-threaded over "
              f"serial time per round: median {np.median(q):.3f} ({q.min():.3f}-{q.max():.3f})")
    write_json(args.json, out)


if __name__ == "__main__":
    main()

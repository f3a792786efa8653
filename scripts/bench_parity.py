"""Bias parity: do SPDY's and the baselines' models of one search run as fast as predicted, alike?

Takes a search's ``result.json`` (``--result``), its profile and database, and times the
three models it wrote (SPDY, uniform, global; their levels as recorded) side by side with
the dense plan for ``--rounds`` interleaved rounds, each in three kernel-format variants:
the profile's formats, every sparse layer multi-threaded, and serial only at >= 90%
sparsity. Prints each model's measured speedup over the dense plan against its predicted
one, and each one's time over uniform's (profile formats) per round: if SPDY's model runs
slower than uniform's at the same predicted speed in every variant, the bias is not in the
format choice. ``--json FILE`` writes the numbers with the hardware fingerprint.

    python scripts/bench_parity.py --result OUT/result.json --profile P.json \\
        --database ~/.cache/spdy/databases/minilm-obs-... [--rounds 10] [--json scripts/results/bench_parity.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import spdy.kernels  # noqa: F401  - before torch: one OpenMP runtime
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

from spdy.api import as_bundle
from spdy.database import Database
from spdy.measure import measure_rounds
from spdy.profile import load_profile
from spdy.profilers import get_backend
from spdy.profilers.base import DENSE, SERIAL_SUFFIX

#: The sparsity from which the ``serial>=.9`` variant runs a layer's kernel serially.
SERIAL_FROM = 0.9


def variants(table, layers: dict[str, dict]) -> dict[str, object]:
    """One model's solution (levels from ``layers``, the result's per-layer record) in three format variants."""
    sol = table.solution(np.array([layers[n]["level"] for n in table.layers]))
    sp = [layers[n]["sparsity"] for n in table.layers]
    parallel = tuple(f.removesuffix(SERIAL_SUFFIX) for f in sol.formats)
    high = tuple(f if f == DENSE else f.removesuffix(SERIAL_SUFFIX) + (SERIAL_SUFFIX if s >= SERIAL_FROM else "")
                 for f, s in zip(sol.formats, sp))
    return {"": sol, "-parallel": dataclasses.replace(sol, formats=parallel),
            "-serial>=.9": dataclasses.replace(sol, formats=high)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", required=True, type=Path, help="a spdy search result.json (MiniLM)")
    ap.add_argument("--profile", required=True, help="the profile that search used")
    ap.add_argument("--database", required=True, type=Path, help="the database that search used")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res = json.loads(args.result.read_text())
    profile = load_profile(args.profile)
    table = profile.table
    backend = get_backend("spdy-cpu", threads=int(profile.settings.get("threads", 2)))
    models = {"spdy": res["layers"], **{n: b["layers"] for n, b in res["baselines"].items() if "layers" in b}}
    sols = {f"{m}{v}": s for m, layers in models.items() for v, s in variants(table, layers).items()}
    r = measure_rounds(profile, as_bundle("minilm"), backend, Database.open(args.database), sols, rounds=args.rounds)
    out = {"fingerprint": backend.fingerprint(), "result": str(args.result), "rounds": args.rounds, "models": {}}
    print(f"{'model':<20} {'predicted':>9} {'measured':>9} {'p10-p90':>11} {'meas/pred':>9} {'time/uniform':>12}")
    for n, sol in sols.items():
        sp = r.speedups(n)
        rel = r.times[n] / r.times["uniform"] if "uniform" in r.times else np.full_like(sp, np.nan)
        m = {"predicted_speedup": float(sol.predicted_speedup), "speedup_median": float(np.median(sp)),
             "p10": float(np.percentile(sp, 10)), "p90": float(np.percentile(sp, 90)),
             "time_over_uniform_median": float(np.median(rel)),
             "serial_layers": sum(f.endswith(SERIAL_SUFFIX) for f in sol.formats)}
        out["models"][n] = m
        print(f"{n:<20} {m['predicted_speedup']:>8.3f}x {m['speedup_median']:>8.3f}x {m['p10']:>5.2f}-{m['p90']:<5.2f} "
              f"{m['speedup_median'] / m['predicted_speedup']:>9.3f} {m['time_over_uniform_median']:>12.3f}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()

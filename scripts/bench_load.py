"""Which pruned models lose most when a neighbour loads the machine? A search's models side by side, with and without one.

Takes a search's ``result.json`` (``--result``), its profile and database, and builds its
models (``--models``: ``spdy``, ``uniform``, ``global``; the dense plan is always timed) in
the profile's kernel formats. Each round times them all end to end, interleaved, once on
a quiet machine and once next to each synthetic neighbour (``--neighbours``), in turn:

* ``memory``: another process streaming a 256 MiB array (``numpy`` copies), which takes
  one core and most of the memory bandwidth a core can pull;
* ``cpu``: another process spinning in a Python loop, which takes one core and no
  bandwidth.

The timer's check for other processes is off here (the neighbour is the point). Prints
per condition each model's speedup over the dense plan (median over the rounds), and each
model's speedup under load over its speedup on the quiet machine: the share of its speed it
keeps. ``--json FILE`` writes the numbers with the hardware fingerprint.

    python scripts/bench_load.py --result OUT/result.json --profile P.json --database DB [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import spdy.kernels  # noqa: F401  - before torch: one OpenMP runtime
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402
from bench_in_model import search_models  # noqa: E402

from spdy.api import as_bundle
from spdy.profile import load_profile
from spdy.profilers import get_backend

#: The neighbours: a Python program each, run in its own process until killed.
NEIGHBOURS = {
    "memory": "import numpy as np\na = np.ones(1 << 25)\nb = np.empty_like(a)\nwhile True:\n    np.copyto(b, a)\n",
    "cpu": "x = 0\nwhile True:\n    x += 1\n",
}


def speedups_under(backend: Any, bundle: Any, plans: list[dict[str, Any]], neighbour: str | None) -> list[float]:
    """Each plan's speedup over the first (the dense plan), timed interleaved next to ``neighbour``."""
    proc = None
    if neighbour is not None:
        proc = subprocess.Popen([sys.executable, "-c", NEIGHBOURS[neighbour]])
        time.sleep(0.5)  # let it reach its loop
    try:
        timings = backend.time_models(bundle, plans)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    return [timings[0].median_s / t.median_s for t in timings[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", required=True, type=Path, help="a spdy search result.json")
    ap.add_argument("--profile", required=True, help="the profile that search used")
    ap.add_argument("--database", required=True, type=Path, help="the database that search used")
    ap.add_argument("--models", default="spdy,uniform,global")
    ap.add_argument("--neighbours", default="memory,cpu", help=f"of {sorted(NEIGHBOURS)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    neighbours = [n for n in args.neighbours.split(",") if n]
    unknown = [n for n in neighbours if n not in NEIGHBOURS]
    if unknown:
        ap.error(f"unknown neighbour(s) {unknown}; expected some of {sorted(NEIGHBOURS)}")
    res = json.loads(args.result.read_text())
    prof = load_profile(args.profile)
    threads = int(prof.settings.get("threads") or res["settings"]["threads"])
    bundle = as_bundle(res["model"])
    backend = get_backend(prof.backend, threads=threads)
    backend.policy = dataclasses.replace(backend.policy, max_others=math.inf)  # the neighbour is the point
    names = args.models.split(",")
    models = search_models(prof, bundle, res, args.database, ["dense", *names])
    plans = [models[n][1] for n in ("dense", *names)]
    conditions = ["quiet", *neighbours]
    got: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names} for c in conditions}
    for r in range(args.rounds):
        for c in (conditions if r % 2 == 0 else conditions[::-1]):
            for n, sp in zip(names, speedups_under(backend, bundle.inference, plans, None if c == "quiet" else c)):
                got[c][n].append(sp)
        print(f"round {r + 1}/{args.rounds}: " + "; ".join(
            f"{c} " + ", ".join(f"{n} {got[c][n][-1]:.2f}x" for n in names) for c in conditions), flush=True)
    med = {c: {n: statistics.median(v) for n, v in per.items()} for c, per in got.items()}
    print(f"\nspeedup over the dense plan, median of {args.rounds} rounds (kept: under load / quiet)")
    print(f"{'model':<10}" + "".join(f" {c:>16}" for c in conditions))
    for n in names:
        cells = [f"{med['quiet'][n]:.2f}x"] + [f"{med[c][n]:.2f}x ({med[c][n] / med['quiet'][n]:.2f})"
                                             for c in neighbours]
        print(f"{n:<10}" + "".join(f" {x:>16}" for x in cells))
    predicted = {n: prof.table.dense_total_s / prof.table.predicted_time(models[n][0]) for n in names}
    write_json(str(args.json) if args.json else None, {
        "fingerprint": backend.fingerprint(), "result": str(args.result), "profile": str(args.profile),
        "rounds": args.rounds, "threads": threads, "predicted_speedup": predicted,
        "speedups": got, "median": med})


if __name__ == "__main__":
    main()

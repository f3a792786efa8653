"""The CNN example through the user-model path: the digits ResNet pruned with ``spdy search``.

Runs, per target, the command a user would run::

    spdy search --model spdy.examples.digits:factory --speedup 2x -o out/digits-2x [--max-evals N]

then scores dense, SPDY and both baselines on the held-out 20% of scikit-learn's
digits (accuracy), next to the measured speedups from ``result.json``.

    python scripts/bench_digits.py [--targets 1.5,2] [--max-evals 100] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import spdy.kernels  # noqa: F401  - before torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="1.5,2")
    ap.add_argument("--max-evals", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="passed to spdy search (default: its own, 2 here)")
    ap.add_argument("--seed", type=int, default=None, help="passed to spdy search (default: its own)")
    ap.add_argument("--out", default="out/bench_digits")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from spdy.api import apply
    from spdy.examples.digits import factory, heldout
    from spdy.grid import DEFAULT_GRID
    from spdy.hardware import fingerprint
    from spdy.results import load_result
    from spdy.stages import ensure_database

    bundle = factory()
    rows: list[dict[str, Any]] = [{"profile": "dense", "target": 1.0, "measured_speedup": 1.0, "calibration_loss": 0.0,
                                   "heldout_accuracy": heldout(bundle.model)["accuracy"]}]
    walls = {}
    for t in [float(x) for x in args.targets.split(",")]:
        out = Path(args.out) / f"{t:g}x"
        cmd = ["spdy", "search", "--model", "spdy.examples.digits:factory", "--speedup", f"{t:g}x",
               "--max-evals", str(args.max_evals), "-o", str(out)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        if args.seed is not None:
            cmd += ["--seed", str(args.seed)]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(proc.stderr)
        walls[f"{t:g}x"] = time.perf_counter() - t0
        if proc.returncode != 0:  # e.g. out of reach end to end: a row saying why, then the next target
            why = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
            rows.append({"profile": "(all)", "target": t, "measured_speedup": None, "calibration_loss": None,
                         "heldout_accuracy": None, "error": why[-1] if why else f"exit {proc.returncode}"})
            print(rows[-1], flush=True)
            continue
        res = load_result(out)
        db = ensure_database(bundle, grid=DEFAULT_GRID)
        entries = [("spdy", res)] + [(k, v) for k, v in res["baselines"].items() if "layers" in v]
        for name, r in entries:
            levels = {n: info["level"] for n, info in r["layers"].items()}
            if name == "spdy":  # what a user deploys: OUT/model (weights + BatchNorm statistics) applied
                model = apply(copy.deepcopy(bundle.model), out)
            else:
                model = bundle.retune_batchnorm(db.stitch(bundle.model, levels, inplace=False))
            loss = r["calibration_loss"]["pruned"] if name == "spdy" else r["calibration_loss"]
            rows.append({"profile": name, "target": t, "measured_speedup": r["measured_speedup"],
                         "calibration_loss": loss, "heldout_accuracy": heldout(model)["accuracy"]})
            print(rows[-1], flush=True)
    lines = ["| target | profile | measured speedup | calibration loss (KL) | held-out accuracy |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['target']:g}x | (all) | {r['error']} | | |")
            continue
        ms = "-" if r["measured_speedup"] is None else f"{r['measured_speedup']:.2f}x"
        lines.append(f"| {r['target']:g}x | {r['profile']} | {ms} | {r['calibration_loss']:.4f} | {r['heldout_accuracy']:.4f} |")
    print("\n".join(lines))
    print("wall per target (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()))
    write_json(args.json, {"fingerprint": fingerprint(args.threads or 2), "settings": vars(args), "rows": rows, "wall_s": walls})
    return 0


if __name__ == "__main__":
    sys.exit(main())

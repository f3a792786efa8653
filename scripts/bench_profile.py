"""Benchmark the latency profiler: wall time, run-to-run agreement and end-to-end accuracy.

Runs ``spdy profile`` RUNS times, each in a fresh process (as a user would), on MiniLM
(36 Linear layers; the full 42-level SPDY grid by default) with ``--validate K``, then
reports:

* the wall time of each profile (the issue's bar: <= 5 minutes for 36 x 42);
* run-to-run agreement: per layer, the median over levels of |t1 - t2| / mean(t1, t2),
  then the median over layers (bar: <= 5%), and the same for the base time;
* validation: median over K random level vectors of |predicted - measured| / measured
  (bar for spdy-cpu: <= 5%).

    python scripts/bench_profile.py --backend spdy-cpu --json scripts/results/bench_profile_spdy-cpu.json
    python scripts/bench_profile.py --backend ort-cpu --runs 1 --validate 10
    python scripts/bench_profile.py --backend spdy-cpu --grid small --runs 2     # 7 levels, quicker

Other processes competing for the CPU are detected (Linux PSI) and disturbed samples
discarded; the JSON records how many, per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spdy.profilers.profiler import signed_validation_error, state_validation_errors, validation_error

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

SMALL_GRID = ["0.5", "0.7", "0.8", "0.9", "0.95", "0.99"]


def run_profile(args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "spdy.cli", "-q", "profile", "--model", args.model, "--backend", args.backend,
           "--validate", str(args.validate), "--seed", str(args.seed), "-o", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.grid == "small":
        cmd += ["--grid-levels", *SMALL_GRID]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"spdy profile failed (exit {proc.returncode})")
    d = json.loads(out.read_text())
    return {"wall_s": wall, "profile": d}


def agreement(a: dict, b: dict) -> dict:
    ta = np.array([rec["times_s"] for rec in a["layers"]])
    tb = np.array([rec["times_s"] for rec in b["layers"]])
    rel = np.abs(ta - tb) / np.maximum((ta + tb) / 2, 1e-12)
    per_layer = np.median(rel, axis=1)
    fa = [rec.get("formats") for rec in a["layers"]]
    fb = [rec.get("formats") for rec in b["layers"]]
    same_fmt = float(np.mean([x == y for la, lb in zip(fa, fb) for x, y in zip(la or [], lb or [])])) if fa[0] else None
    return {
        "median_per_layer_rel_diff": float(np.median(per_layer)),
        "max_per_layer_rel_diff": float(per_layer.max()),
        "median_cell_rel_diff": float(np.median(rel)),
        "p90_cell_rel_diff": float(np.quantile(rel, 0.9)),
        "base_rel_diff": abs(a["base_s"] - b["base_s"]) / ((a["base_s"] + b["base_s"]) / 2),
        "dense_total_rel_diff": abs(a["dense_total_s"] - b["dense_total_s"]) / ((a["dense_total_s"] + b["dense_total_s"]) / 2),
        "same_format_share": same_fmt,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="spdy-cpu")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=2, help="profiles, each in a fresh process")
    ap.add_argument("--validate", type=int, default=10, help="random level vectors per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", choices=["full", "small"], default="full")
    ap.add_argument("--keep", default=None, help="folder to keep the profile JSONs in")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_profile_"))
    folder.mkdir(parents=True, exist_ok=True)
    runs = []
    for i in range(args.runs):
        out = folder / f"{args.model}-{args.backend}-run{i + 1}.json"
        print(f"run {i + 1}/{args.runs}: spdy profile --backend {args.backend} ...", flush=True)
        r = run_profile(args, out)
        p = r["profile"]
        rec = {
            "wall_s": round(r["wall_s"], 1),
            "profile_s": p["settings"].get("profile_seconds"),
            "layers": len(p["layers"]),
            "levels": len(p["grid"]),
            "base_ms": p["base_s"] * 1e3,
            "dense_predicted_ms": p["dense_total_s"] * 1e3,
            "dense_measured_ms": p["settings"].get("dense_measured_s", float("nan")) * 1e3,
            "samples": p["settings"].get("samples"),
            "validation": p["validation"],
            "validation_error": validation_error(p["validation"]) if p["validation"] else None,
            "signed_validation_error": signed_validation_error(p["validation"]) if p["validation"] else None,
            "state_validation_errors": state_validation_errors(p["validation"]) if p["validation"] else None,
            "in_model": p["settings"].get("in_model"),
            "measurement": p["settings"].get("measurement"),
            "base_drift": (p["validation"][-1].get("base_measured_s", float("nan")) / p["base_s"] - 1)
            if p["validation"] else None,
            "path": str(out),
        }
        runs.append(rec)
        print(f"  {rec['layers']} layers x {rec['levels']} levels in {rec['wall_s']:.0f} s (profile {rec['profile_s']} s); "
              f"base {rec['base_ms']:.2f} ms, dense {rec['dense_predicted_ms']:.2f} ms predicted / "
              f"{rec['dense_measured_ms']:.2f} ms measured; samples {rec['samples']}")
        if rec["validation_error"] is not None:
            print(f"  validation over {len(rec['validation'])} random profiles: median |error| "
                  f"{rec['validation_error'] * 100:.1f}% (signed {rec['signed_validation_error'] * 100:+.1f}%); "
                  f"with the state read in the round {rec['state_validation_errors'][0] * 100:.1f}% "
                  f"(signed {rec['state_validation_errors'][1] * 100:+.1f}%); "
                  f"base drift since the profile {rec['base_drift'] * 100:+.1f}%")
    agree = None
    if len(runs) >= 2:
        a = json.loads(Path(runs[0]["path"]).read_text())
        b = json.loads(Path(runs[1]["path"]).read_text())
        agree = agreement(a, b)
        print(f"runs 1 vs 2: median per-layer difference {agree['median_per_layer_rel_diff'] * 100:.1f}% "
              f"(worst layer {agree['max_per_layer_rel_diff'] * 100:.1f}%), base {agree['base_rel_diff'] * 100:.1f}%, "
              f"dense total {agree['dense_total_rel_diff'] * 100:.1f}%"
              + (f", same format {agree['same_format_share'] * 100:.0f}% of cells" if agree["same_format_share"] is not None else ""))
    print()
    print(f"{'run':>3} {'wall s':>7} {'base ms':>8} {'dense ms':>9} {'val err':>8} {'discarded':>10}")
    for i, r in enumerate(runs, 1):
        disc = (r["samples"] or {}).get("discarded", 0)
        ve = f"{r['validation_error'] * 100:.1f}%" if r["validation_error"] is not None else "-"
        print(f"{i:>3} {r['wall_s']:7.0f} {r['base_ms']:8.2f} {r['dense_predicted_ms']:9.2f} {ve:>8} {disc:>10}")
    first = json.loads(Path(runs[0]["path"]).read_text())
    write_json(args.json, {
        "benchmark": "bench_profile",
        "command": " ".join(sys.argv),
        "backend": args.backend,
        "model": args.model,
        "grid": args.grid,
        "fingerprint": first["fingerprint"],
        "settings": first["settings"],
        "env": {k: v for k, v in os.environ.items() if k.startswith(("SPDY_", "OMP_", "NUMBA_", "GOMP_"))},
        "runs": runs,
        "agreement": agree,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Read the machine's state after the fact out of saved validations.

A profile's ``validation`` records hold, for each checked random model, its predicted and
measured times and the dense model's time in the same round. This script takes, for every
choice of ``--anchors`` of those models, the line ``measured = scale * predicted + offset``
through them and the dense model (:func:`spdy.profilers.profiler.read_state`, as
``spdy profile --validate`` does with models of its own), puts the other models' predictions
on it and reports their median error: how well the table predicts a round once the state of
that round is known, for validations saved before the state was read in the round.

    python scripts/validation_state.py scripts/results/validate_minilm_*.json --json OUT.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from _common import write_json
from spdy.profilers.profiler import read_state


def post_hoc(profile: dict[str, Any], anchors: int) -> dict[str, Any]:
    """The plain and the state-read errors of one saved validation (see the module docstring)."""
    rec = profile["validation"]
    pred = np.array([r["predicted_s"] for r in rec])
    meas = np.array([r["measured_s"] for r in rec])
    plain = np.array([r["error"] for r in rec])
    dense_pred, dense_meas = profile["dense_total_s"], rec[0]["dense_measured_s"]
    abs_med, signed_med = [], []
    for pick in itertools.combinations(range(len(rec)), anchors):
        idx = list(pick)
        scale, offset = read_state([dense_pred, *pred[idx]], [dense_meas, *meas[idx]])
        rest = np.setdiff1d(np.arange(len(rec)), idx)
        err = (scale * pred[rest] + offset) / meas[rest] - 1
        abs_med.append(float(np.median(np.abs(err))))
        signed_med.append(float(np.median(err)))
    out = {"models": len(rec), "plain_median_abs": float(np.median(np.abs(plain))),
           "plain_median": float(np.median(plain)), "choices": len(abs_med),
           "state_median_abs": float(np.median(abs_med)), "state_median_abs_p90": float(np.percentile(abs_med, 90)),
           "state_median": float(np.median(signed_med))}
    if "error_state" in rec[0]:
        es = np.array([r["error_state"] for r in rec])
        out["in_round_median_abs"] = float(np.median(np.abs(es)))
        out["in_round_median"] = float(np.median(es))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: python scripts/validation_state.py scripts/results/validate_minilm_v5_*.json")
    ap.add_argument("profiles", nargs="+", help="profile JSONs with a validation")
    ap.add_argument("--anchors", type=int, default=3, help="checked models taken to read the state (default 3)")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    rows = {}
    print(f"{'profile':58} {'plain':>14} {'state read (median, p90 over choices)':>40} {'in the round':>14}")
    for f in args.profiles:
        d = json.loads(Path(f).read_text())
        if len(d.get("validation") or []) <= args.anchors:
            print(f"{Path(f).name:58} needs more than {args.anchors} validated models", file=sys.stderr)
            continue
        r = post_hoc(d, args.anchors)
        rows[Path(f).name] = r
        inr = (f"{r['in_round_median_abs'] * 100:5.1f}% ({r['in_round_median'] * 100:+.1f}%)"
               if "in_round_median_abs" in r else "-")
        print(f"{Path(f).name:58} {r['plain_median_abs'] * 100:5.1f}% ({r['plain_median'] * 100:+5.1f}%) "
              f"{r['state_median_abs'] * 100:18.1f}% ({r['state_median'] * 100:+.1f}%), p90 {r['state_median_abs_p90'] * 100:.1f}% "
              f"{inr:>14}")
    if args.json:
        write_json(args.json, {"benchmark": "validation_state", "command": " ".join(sys.argv), "anchors": args.anchors,
                               "profiles": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

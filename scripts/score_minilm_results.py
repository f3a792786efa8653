"""Held-out scores of the three models of finished MiniLM searches (SPDY, uniform, global).

For each ``OUT`` directory written by ``spdy search --model minilm``: the per-layer levels
of SPDY's model and of both baselines from ``OUT/result.json``, stitched from the search's
reconstruction database and scored on data the search never saw: the Lee-50 human
similarity benchmark (Pearson and Spearman correlation with the human ratings, and the
Spearman agreement of the model's pair similarities with the dense model's) and the mean
cosine similarity to the dense model's embeddings on held-out documents. Prints a table next to each model's
measured speedup and calibration loss; ``--json FILE`` writes it.

    python scripts/score_minilm_results.py out/s0 out/s1 out/s2 --json scores.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spdy.kernels  # noqa: E402, F401 - before torch: one OpenMP runtime

from _common import minilm_scorer, write_json  # noqa: E402
from spdy.database import Database  # noqa: E402
from spdy.models.base import load_model  # noqa: E402
from spdy.results import load_result  # noqa: E402

METRICS = ("lee50_pearson", "lee50_spearman", "lee50_agreement", "heldout_cosine")


def models_of(result: dict[str, Any]) -> dict[str, tuple[dict[str, int], dict[str, Any]]]:
    """``{method: ({layer: level}, its entry)}`` for SPDY's model and each baseline in a result."""
    out = {"spdy": ({k: int(v["level"]) for k, v in result["layers"].items()}, result)}
    for name, b in (result.get("baselines") or {}).items():
        if isinstance(b, dict) and b.get("layers"):
            out[name] = ({k: int(v["level"]) for k, v in b["layers"].items()}, b)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outs", nargs="+", type=Path, help="output directories of spdy search --model minilm")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bundle = load_model("minilm")
    score = minilm_scorer(bundle)
    rows: list[dict[str, Any]] = [{"run": "dense", "method": "dense", **score(bundle.model)}]
    for out in args.outs:
        res = load_result(out / "result.json" if out.is_dir() else out)
        db = Database.open(res["database"])
        for method, (levels, entry) in models_of(res).items():
            pruned = db.stitch(bundle.model, levels, inplace=False)
            loss = entry.get("calibration_loss")
            if isinstance(loss, dict):  # SPDY's own entry: {"dense": ..., "pruned": ...}
                loss = loss.get("pruned")
            rows.append({"run": str(out), "method": method, "measured_speedup": entry.get("measured_speedup"),
                         "calibration_loss": loss, **score(pruned)})
            del pruned
    print(f"{'run':<28} {'method':<8} {'measured':>9} {'loss':>8} " + " ".join(f"{m:>15}" for m in METRICS))
    for r in rows:
        sp = f"{r['measured_speedup']:.2f}x" if r.get("measured_speedup") else ""
        loss = f"{r['calibration_loss']:.4f}" if r.get("calibration_loss") is not None else ""
        print(f"{r['run'][-28:]:<28} {r['method']:<8} {sp:>9} {loss:>8} " + " ".join(f"{r[m]:15.4f}" for m in METRICS))
    means = {}
    for method in ("spdy", "uniform", "global"):
        got = [r for r in rows if r["method"] == method]
        if got:
            means[method] = {m: statistics.mean(r[m] for r in got) for m in METRICS}
            print(f"{'mean over runs':<28} {method:<8} {'':>9} {'':>8} " + " ".join(f"{means[method][m]:15.4f}" for m in METRICS))
    write_json(args.json, {"rows": rows, "means": means})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SPDY against uniform and global magnitude on all-MiniLM-L6-v2, at measured speedups.

For each target speedup: the SPDY search plus both one-shot baselines, all from the
same reconstruction database and latency profile (spdy-cpu, 1 x 128 tokens), each
pruned model timed end to end against the dense one in torch eager, in ONNX Runtime and
in spdy's dense plan (side by side, round by round; the target is over ``--reference``,
default the fastest of torch eager, torch.compile and ONNX Runtime), and scored on

* calibration loss (cosine distance to the dense embeddings, the 128 calibration docs);
* Lee-50: Pearson / Spearman correlation of embedding cosine similarity with the
  human document similarity ratings (gensim's lee.cor + similarities0-1.txt); the dense
  model's own scores are the first row, and a pruned model can score above them;
* Lee-50 agreement: Spearman correlation of the pruned model's 1,225 Lee-50 pair
  similarities with the dense model's (1 = the dense model's ranking of document pairs kept);
* held-out cosine: mean cosine similarity to the dense embeddings on the
  lee_background.cor documents not used for calibration (172 docs).

    python scripts/bench_minilm.py [--targets 1.5,2,2.5,3] [--max-evals 120] [--reference fastest] [--json FILE] [--md FILE]

Prints a markdown table and writes JSON (``fingerprint``, ``rows``, ``stages``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import spdy.kernels  # noqa: F401  - before torch: one OpenMP runtime for torch and the kernels


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import minilm_scorer, write_json  # noqa: E402

from spdy.api import search  # noqa: E402
from spdy.errors import InfeasibleBudgetError  # noqa: E402
from spdy.models.base import load_model  # noqa: E402
from spdy.profilers import get_backend  # noqa: E402
from spdy.results import Outcome  # noqa: E402
from spdy.stages import ensure_database, ensure_profile  # noqa: E402


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="1.5,2,2.5,3", help="comma-separated target speedups")
    ap.add_argument("--max-evals", type=int, default=120, help="search evaluations per target (Algorithm 4 in "
                    "miniature; 0 = the full default, k=100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", default="fastest", choices=("fastest", "torch", "torch_channels_last", "torch_compile", "onnxruntime"),
                    help="the dense runtime the targets are over")
    ap.add_argument("--calibration", type=int, default=128, help="calibration documents (the rest are held out)")
    ap.add_argument("--out", default="out/bench_minilm", help="folder for each target's spdy search output")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    return ap.parse_args()


def main() -> int:
    args = _args()
    targets = [float(t.strip().rstrip("x")) for t in args.targets.split(",") if t.strip()]

    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    bundle = load_model("minilm", n_calibration=args.calibration)
    backend = get_backend("spdy-cpu", threads=args.threads)
    stages["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    profile, profile_path, measured = ensure_profile(bundle, backend)
    stages["profile" if measured else "profile (cached)"] = time.perf_counter() - t0
    if not measured:
        stages["profile (when measured)"] = float(profile.settings.get("profile_seconds", float("nan")))
    t0 = time.perf_counter()
    db = ensure_database(bundle, grid=profile.table.grid, progress=True)
    stages["database"] = time.perf_counter() - t0
    stages["database (sum of layer builds)"] = float(sum(e.get("seconds", 0.0) for e in db.manifest["layers"]))

    score = minilm_scorer(bundle)

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = [{"profile": "dense", "target": 1.0, "measured_speedup": None,
                                   "predicted_speedup": 1.0, "calibration_loss": 0.0, **score(bundle.model)}]
    stages["eval dense"] = time.perf_counter() - t0
    searches = {}
    infeasible: dict[float, str] = {}
    for target in targets:
        print(f"\n=== target {target:g}x ===", flush=True)
        try:
            res = search(bundle, speedup=target, backend="spdy-cpu", threads=args.threads, profile=profile_path,
                         database=db, max_evals=args.max_evals or None, seed=args.seed, reference=args.reference,
                         out=Path(args.out) / f"{target:g}x")
        except InfeasibleBudgetError as exc:
            print(f"  infeasible: {exc}")
            infeasible[target] = str(exc)
            continue
        searches[target] = res.to_json()
        for k, v in res.stage_s.items():
            stages[f"{target:g}x {k}"] = v
        t0 = time.perf_counter()
        rows += _score_outcomes(res, target, bundle, db, score)
        stages[f"{target:g}x eval"] = time.perf_counter() - t0

    table = _markdown(rows, infeasible)
    print("\n" + table)
    print("\nstages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(table + "\n")
    write_json(args.json, {"fingerprint": backend.fingerprint(), "settings": vars(args), "rows": rows,
                           "stages": stages, "searches": searches, "infeasible": {str(k): v for k, v in infeasible.items()}, "profile": str(profile_path),
                           "database": str(db.path)})
    return 0


def _score_outcomes(res: Any, target: float, bundle: Any, db: Any, score: Any) -> list[dict[str, Any]]:
    """A row per feasible outcome of one search (SPDY and the baselines) with its scores."""
    rows = []
    outcomes: list[Outcome | str] = [res.result, *res.baselines.values()]
    for o in outcomes:
        if isinstance(o, str):
            print(f"  baseline infeasible: {o}")
            continue
        pruned = db.stitch(bundle.model, o.solution, inplace=False)
        rows.append({"profile": o.method, "target": target, "reference": (res.reference or {}).get("runtime"),
                     "measured_speedup": o.measured_speedup,
                     **{f"vs_{rt}": o.runtime_speedups.get(rt) for rt in RUNTIMES_REPORTED},
                     **{f"vs_{rt}_p10_p90": [s["p10"], s["p90"]] for rt in RUNTIMES_REPORTED
                        if (s := o.speedup_summary(rt))},
                     "predicted_speedup": o.solution.predicted_speedup, "calibration_loss": o.calibration_loss,
                     **score(pruned)})
        del pruned
        r = rows[-1]
        print(f"  {r['profile']:<8} measured {r['measured_speedup']:.2f}x over {r['reference']} ("
              + ", ".join(f"{rt} {r[f'vs_{rt}']:.2f}x" for rt in RUNTIMES_REPORTED if r.get(f"vs_{rt}")) + ")"
              + f"  loss {r['calibration_loss']:.5f}  "
              f"lee50 {r['lee50_pearson']:.3f}/{r['lee50_spearman']:.3f} (agreement {r['lee50_agreement']:.3f})  "
              f"held-out cos {r['heldout_cosine']:.4f}",
              flush=True)
    return rows


#: the dense runtimes each pruned model's speedup is reported over
RUNTIMES_REPORTED = ("torch", "onnxruntime", "dense_plan")


def _markdown(rows: list[dict[str, Any]], infeasible: dict[float, str]) -> str:
    lines = ["| target | profile | measured speedup (over) | vs torch eager | vs ONNX Runtime | vs dense plan "
             "| predicted (dense plan) | calibration loss | Lee-50 Pearson | Lee-50 Spearman | Lee-50 agreement "
             "| held-out cosine |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def x(v: Any) -> str:
        return f"{v:.2f}x" if v is not None else ""

    for r in rows:
        over = f" ({r['reference']})" if r.get("reference") else ""
        lines.append(f"| {r['target']:g}x | {r['profile']} | {x(r['measured_speedup'])}{over} "
                     + "".join(f"| {x(r.get(f'vs_{rt}'))} " for rt in RUNTIMES_REPORTED)
                     + f"| {r['predicted_speedup']:.2f}x | {r['calibration_loss']:.5f} | {r['lee50_pearson']:.4f} "
                     f"| {r['lee50_spearman']:.4f} | {r['lee50_agreement']:.4f} | {r['heldout_cosine']:.4f} |")
    for t in infeasible:
        lines.append(f"| {t:g}x | (all) | infeasible | | | | | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Algorithm 4 against the evolutionary search, at equal numbers of full loss evaluations.

For each target (predicted speedup on the cached spdy-cpu profile, no latency check or
fit, so every method answers the same budget), seed and evaluation budget ``B``:

* ``spdy``: Algorithm 4 in miniature for ``B`` evaluations;
* ``evo``: the evolutionary search (``--strategy evo``); a partial evaluation counts by
  its share of the calibration batches, and the result at ``B`` is the best trial whose
  cumulative cost is at most ``B`` (the search's trials do not depend on its budget);
* ``spdy+evo``: Algorithm 4 for ``B/2`` evaluations, then evo from its best levels for
  the rest (its seed trial re-scores those levels and counts);
* ``evo-small`` (with ``--small``): evo whose children make one move of one level
  (EvoPress's level switch: one layer a level harder, another a level lighter);
* ``uniform`` and ``global`` (one evaluation each) for reference.

``--model minilm`` (default): 
the loss is computed on the first ``--calibration`` documents (default 64 of the 128
the database was built on, to keep the comparison affordable on 2 cores). Every final
profile is scored on that calibration loss and on held-out data: Lee-50
Pearson correlation with human similarity ratings and the mean cosine similarity to the
dense embeddings on the lee_background documents not used for calibration.
``--model digits``: the digits ResNet (``spdy.examples.digits:factory``, KL loss on the
first 256 of its 512 calibration images), scored on the held-out 20% of the digits: accuracy and top-1
agreement with the dense model (BatchNorm statistics re-estimated on the calibration
images, as the search does). Wall time per search is reported, but the machine is
shared, so only the losses are comparable.

    python scripts/bench_evo.py [--targets 2] [--budgets 40,120] [--seeds 0,1,2] [--json FILE]
    python scripts/bench_evo.py --model digits --targets 1.5,2 --budgets 40,150,500 --small
    python scripts/bench_evo.py --merge seed0.json,seed1.json,seed2.json --json all.json
"""

from __future__ import annotations

import argparse
import json
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import spdy.kernels  # noqa: F401  - before torch: one OpenMP runtime for torch and the kernels

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import minilm_scorer, write_json  # noqa: E402


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("minilm", "digits"), default="minilm")
    ap.add_argument("--small", action="store_true", help="also run evo with one-level, one-move children (evo-small)")
    ap.add_argument("--methods", default="spdy,evo,spdy+evo", help="comma-separated: spdy, evo, spdy+evo")
    ap.add_argument("--targets", default="2", help="comma-separated predicted speedups")
    ap.add_argument("--budgets", default="40,120", help="comma-separated numbers of full loss evaluations")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1, help="threads of the cached spdy-cpu profile")
    ap.add_argument("--profile", default=None, help="use this profile JSON (even one made for an earlier form of the "
                    "model: the comparison is at predicted speedups on one fixed table) instead of the cached one")
    ap.add_argument("--eval-threads", type=int, default=2, help="torch threads for the loss evaluations")
    ap.add_argument("--calibration", type=int, default=None,
                    help="calibration samples the loss is computed on, the first of those the database was built on "
                    "(default: minilm 64 of 128 documents, digits 256 of 512 images)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge", default=None, metavar="FILES",
                    help="comma-separated JSON files of earlier runs (e.g. one per seed): print their rows as one "
                    "table (and write them to --json) instead of running")
    return ap.parse_args()


def _row(method: str, target: float, seed: int, budget: int, levels: np.ndarray, loss: float, evals: float,
         wall: float, table: Any, scores: dict[str, float]) -> dict[str, Any]:
    return {"method": method, "target": target, "seed": seed, "budget": budget, "evaluations": evals,
            "calibration_loss": loss, "predicted_speedup": table.dense_total_s / table.predicted_time(levels),
            "wall_s": wall, "levels": [int(x) for x in levels], **scores}


def _evo_prefix(srch: Any, budget: float) -> tuple[np.ndarray, float, float]:
    """The best trial of an evo search among those whose cumulative cost is at most ``budget``."""
    spent, used, best = 0.0, 0.0, None
    from spdy.sensitivity import _slot

    for t in sorted(srch._done(), key=_slot):
        spent += t.user_attrs["evaluations"]
        if spent > budget + 1e-9:
            break
        used = spent
        if best is None or t.value < best[1]:
            best = (np.array(t.user_attrs["levels"]), float(t.value))
    assert best is not None
    return best[0], best[1], used


def _evo_rows(name: str, table: Any, obj: Any, target: float, seed: int, budgets: list[int], score: Any,
              evo_cfg: Any) -> list[dict[str, Any]]:
    from spdy.evo import EvoSearch
    from spdy.sensitivity import SearchConfig

    rows = []
    t0 = time.perf_counter()
    evo = EvoSearch(table, obj, SearchConfig(speedup=target, max_evals=max(budgets), seed=seed, strategy="evo"),
                    evo=evo_cfg)
    evo.run()
    wall = time.perf_counter() - t0
    for b in budgets:
        levels, loss, spent = _evo_prefix(evo, b)
        rows.append(_row(name, target, seed, b, levels, loss, spent, wall * spent / evo.evaluations(), table,
                         score(levels)))
        rows[-1]["trial_losses"] = [h["loss"] for h in evo.history()]  # every generation's winner, in order
        print(f"  {name:<9}B={b:<4} loss {loss:.5f} ({spent:.1f} evaluations)", flush=True)
    return rows


def _runs(table: Any, obj: Any, target: float, seed: int, budgets: list[int], score: Any,
          methods: list[str]) -> list[dict[str, Any]]:
    from spdy.evo import EvoConfig, EvoSearch
    from spdy.sensitivity import Search, SearchConfig

    rows = []
    for b in budgets if "spdy" in methods else []:
        t0 = time.perf_counter()
        res = Search(table, obj, SearchConfig(speedup=target, max_evals=b, seed=seed, strategy="spdy")).run()
        rows.append(_row("spdy", target, seed, b, res.solution.levels, res.loss, b, time.perf_counter() - t0, table,
                         score(res.solution.levels)))
        print(f"  spdy     B={b:<4} loss {res.loss:.5f}", flush=True)
    if "evo" in methods:
        rows += _evo_rows("evo", table, obj, target, seed, budgets, score, EvoConfig())
    if "evo-small" in methods:
        rows += _evo_rows("evo-small", table, obj, target, seed, budgets, score, EvoConfig(max_step=1, max_moves=1))
    for b in budgets if "spdy+evo" in methods else []:
        t0 = time.perf_counter()
        first = Search(table, obj, SearchConfig(speedup=target, max_evals=b // 2, seed=seed, strategy="spdy")).run()
        init = tuple(int(x) for x in first.solution.levels)
        warm = EvoSearch(table, obj, SearchConfig(speedup=target, max_evals=b - b // 2, seed=seed, strategy="evo"),
                         evo=EvoConfig(init_levels=init))
        res = warm.run()
        spent = b // 2 + warm.evaluations()
        rows.append(_row("spdy+evo", target, seed, b, res.solution.levels, res.loss, spent, time.perf_counter() - t0,
                         table, score(res.solution.levels)))
        print(f"  spdy+evo B={b:<4} loss {res.loss:.5f} ({spent:.1f} evaluations)", flush=True)
    return rows


def _baselines(table: Any, obj: Any, bundle: Any, target: float, score: Any) -> list[dict[str, Any]]:
    from spdy.measure import baseline

    rows = []
    for name in ("uniform", "global"):
        o = baseline(name, table, bundle, target, obj)
        rows.append(_row(name, target, -1, 1, o.solution.levels, o.calibration_loss, 1, 0.0, table,
                         score(o.solution.levels)))
        print(f"  {name:<8} loss {o.calibration_loss:.5f}", flush=True)
    return rows


SCORES = {"minilm": (("lee50_pearson", "Lee-50 Pearson"), ("heldout_cosine", "held-out cosine")),
          "digits": (("heldout_accuracy", "held-out accuracy"), ("heldout_agreement", "held-out top-1 agreement"))}


def _markdown(rows: list[dict[str, Any]]) -> str:
    cols = SCORES["digits" if "heldout_accuracy" in rows[0] else "minilm"]
    keys = sorted({(r["target"], r["method"], r["budget"]) for r in rows})
    lines = ["| target | method | full evaluations | calibration loss (mean ± sd) | " + " | ".join(c[1] for c in cols)
             + " | seeds |", "|---|---|---|---|" + "---|" * len(cols) + "---|"]
    for target, method, budget in keys:
        rs = [r for r in rows if (r["target"], r["method"], r["budget"]) == (target, method, budget)]
        def ms(k: str, f: str) -> str:
            v = np.array([r[k] for r in rs])
            return f"{v.mean():{f}} ± {v.std(ddof=1) if len(v) > 1 else 0.0:{f}}"
        lines.append(f"| {target:g}x | {method} | {budget} | {ms('calibration_loss', '.4f')} | "
                     + " | ".join(ms(c[0], ".4f") for c in cols) + f" | {len(rs)} |")
    return "\n".join(lines)


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, Path, Any]:
    """(bundle, backend, table, objective, profile path, held-out scorer of levels) for ``args.model``."""
    from spdy.models.base import load_model
    from spdy.profilers import get_backend
    from spdy.stages import CalibrationObjective, ensure_database, ensure_profile

    if args.model == "digits":
        from spdy.examples.digits import accuracy, factory, load_digits_split

        bundle = factory()
    else:
        bundle = load_model("minilm")
    backend = get_backend("spdy-cpu", threads=args.threads)
    if args.profile:
        profile, path, _ = ensure_profile(bundle, backend, path=args.profile, force=True)
    else:
        profile, path, _ = ensure_profile(bundle, backend)
    table = profile.table
    db = ensure_database(bundle, grid=table.grid)
    torch.set_num_threads(args.eval_threads)
    n_cal = args.calibration or (256 if args.model == "digits" else 64)
    if args.model == "digits":
        per = len(bundle.calibration[0])
        obj = CalibrationObjective(dataclasses.replace(bundle, calibration=bundle.calibration[: max(1, n_cal // per)]),
                                   db, table.layers)
        _, _, xte, yte = load_digits_split()
        with torch.no_grad():
            dense_top1 = bundle.model(xte).argmax(-1)

        def score(levels: np.ndarray) -> dict[str, float]:
            model = bundle.retune_batchnorm(
                db.stitch(bundle.model, {n: int(lv) for n, lv in zip(table.layers, levels)}, inplace=False))
            with torch.no_grad():
                agree = float((model(xte).argmax(-1) == dense_top1).float().mean())
            return {"heldout_accuracy": accuracy(model, xte, yte), "heldout_agreement": agree}

        return bundle, backend, table, obj, path, score
    per_batch = len(bundle.calibration[0]["input_ids"])
    small = dataclasses.replace(bundle, calibration=bundle.calibration[: max(1, n_cal // per_batch)])
    obj = CalibrationObjective(small, db, table.layers)
    score_model = minilm_scorer(bundle)

    def score_minilm(levels: np.ndarray) -> dict[str, float]:
        return score_model(db.stitch(bundle.model, {n: int(lv) for n, lv in zip(table.layers, levels)}, inplace=False))

    return bundle, backend, table, obj, path, score_minilm


def main() -> int:
    args = _args()
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        rows = [r for run in runs for r in run["rows"] if r["seed"] >= 0 or run is runs[0]]
        md = _markdown(rows)
        print(md)
        write_json(args.json, {"fingerprint": runs[0]["fingerprint"], "merged": args.merge.split(","),
                               "settings": [run["settings"] for run in runs], "rows": rows, "table": md})
        return 0
    bundle, backend, table, obj, path, score = _setup(args)
    methods = args.methods.split(",") + (["evo-small"] if args.small else [])
    rows: list[dict[str, Any]] = []
    budgets = [int(b) for b in args.budgets.split(",")]
    for target in [float(t) for t in args.targets.split(",")]:
        print(f"=== {target:g}x (predicted, profile {path}) ===", flush=True)
        rows += _baselines(table, obj, bundle, target, score)
        for seed in [int(s) for s in args.seeds.split(",")]:
            print(f" seed {seed}", flush=True)
            rows += _runs(table, obj, target, seed, budgets, score, methods)
    md = _markdown(rows)
    print("\n" + md)
    write_json(args.json, {"fingerprint": backend.fingerprint(), "settings": vars(args), "profile": str(path),
                           "rows": rows, "table": md})
    return 0


if __name__ == "__main__":
    sys.exit(main())

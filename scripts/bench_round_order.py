"""Does a whole model's time depend on which runner ran just before it? Fixed against shuffled rounds.

A validation round as ``spdy profile --validate`` times it: the profile's dense plan, ``--models``
random pruned models (drawn as the validation draws them), a second copy of the dense plan in the
middle of the round, the base model, and the dense runtimes of spdy's own thread pool (torch eager,
torch.compile) after them, one call per runner per turn. The same runners are timed in turn with
the rounds in a fixed order (the dense plan always right after torch.compile) and shuffled
(:attr:`spdy.profilers.base.TimingPolicy.shuffle`), ``--rounds`` times each, alternating which goes
first. Per order it prints the first copy of the dense plan over the second (1.0 when the slot does
not matter) and the validation's median error of the pruned models against each copy, and ``--json``
writes them with the hardware fingerprint.

    spdy profile --model minilm --backend spdy-cpu -o profile.json
    python scripts/bench_round_order.py --profile profile.json --rounds 4 --json scripts/results/bench_round_order.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import spdy.profilers  # noqa: F401  - before torch: one OpenMP runtime for torch and Numba

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

from spdy.hardware import fingerprint  # noqa: E402
from spdy.models.base import load_model  # noqa: E402
from spdy.profile import load_profile  # noqa: E402
from spdy.profilers import get_backend  # noqa: E402
from spdy.profilers.base import STANDIN, LayerChoice  # noqa: E402
from spdy.profilers.dense_runtimes import dense_runtimes  # noqa: E402
from spdy.profilers.in_model import spanning_level_vectors  # noqa: E402
from spdy.profilers.profiler import level_plans  # noqa: E402


def slots(n_models: int) -> tuple[int, list[int]]:
    """Where the dense plan's second copy sits in a round of the dense plan (slot 0), ``n_models``
    pruned models and the base (last), and the slots of the pruned models, in order."""
    mid = 1 + n_models // 2
    return mid, [*range(1, mid), *range(mid + 1, n_models + 2)]


def round_plans(dense: Any, models: list[Any], base: Any) -> list[Any]:
    """The round's plans in the order of :func:`slots`."""
    mid, _ = slots(len(models))
    return [dense, *models[:mid - 1], dict(dense), *models[mid - 1:], base]


def one_round(backend: Any, bundle: Any, profile: Any, plans: list[Any], extra: list[Any], shuffle: bool,
              vectors: np.ndarray) -> dict[str, float]:
    """One measurement of ``plans`` and the ``extra`` runners in the given order: the dense plan's
    first copy over its second, and the median validation error against each copy."""
    runners = [backend.model_runner(bundle, p) for p in plans] + extra
    policy = replace(backend.policy.for_models(), shuffle=shuffle)
    tm = [t.median_s for t in backend.measure(runners, policy=policy)]
    t = profile.table
    mid, at = slots(len(vectors))
    pruned = [tm[i] for i in at]
    pred = [t.predicted_time(v) / t.dense_total_s for v in vectors]

    def error(dense_s: float) -> float:
        return float(np.median([p / (m / dense_s) - 1 for p, m in zip(pred, pruned)]))

    return {"first_over_second": tm[0] / tm[mid], "dense_first_ms": tm[0] * 1e3, "dense_second_ms": tm[mid] * 1e3,
            "error_vs_first": error(tm[0]), "error_vs_second": error(tm[mid])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="a MiniLM profile written by 'spdy profile -o' (spdy-cpu)")
    ap.add_argument("--models", type=int, default=10, help="random pruned models in the round (default 10)")
    ap.add_argument("--rounds", type=int, default=4, help="measurements per order (default 4)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    bundle = load_model("minilm")
    profile = load_profile(args.profile, specs=bundle.inference_layers())
    backend = get_backend(profile.backend, threads=int(profile.settings["threads"]))
    inference = bundle.inference
    t = profile.table
    vectors = spanning_level_vectors(len(t.layers), len(t.grid), args.models, 0)
    dense = level_plans(profile, bundle, np.zeros((1, len(t.layers)), dtype=np.int64))[0]
    models = level_plans(profile, bundle, vectors)
    mid, _ = slots(len(models))
    plans = round_plans(dense, models, {n: LayerChoice(STANDIN) for n in t.layers})
    runtimes = dense_runtimes(backend, inference, state_probe=False)
    same = {name: rt for name, rt in runtimes.runtimes.items() if rt.timer is None}
    extra = [rt.runner for rt in same.values()]
    print(f"{len(models)} random models, the dense plan in slots 0 and {mid}, then the base and "
          f"{', '.join(same)} ({backend.threads} threads)")
    rows: dict[str, list[dict[str, float]]] = {"fixed": [], "shuffled": []}
    for r in range(args.rounds):
        for order in (("fixed", "shuffled") if r % 2 == 0 else ("shuffled", "fixed")):
            rows[order].append(one_round(backend, inference, profile, plans, extra, order == "shuffled", vectors))
            row = rows[order][-1]
            print(f"round {r} {order:8s}: dense plan {row['dense_first_ms']:.2f} ms in slot 0, "
                  f"{row['dense_second_ms']:.2f} ms in slot {mid} ({row['first_over_second'] - 1:+.1%}); median error "
                  f"{row['error_vs_first']:+.1%} against slot 0, {row['error_vs_second']:+.1%} against slot {mid}",
                  flush=True)
    print()
    print("| order | slot 0 / slot mid (median, min-max) | median error vs slot 0 | vs slot mid |")
    print("|---|---|---|---|")
    for order, got in rows.items():
        ratio = [g["first_over_second"] for g in got]
        print(f"| {order} | {statistics.median(ratio):.3f} ({min(ratio):.3f}-{max(ratio):.3f}) | "
              f"{statistics.median(g['error_vs_first'] for g in got):+.1%} | "
              f"{statistics.median(g['error_vs_second'] for g in got):+.1%} |")
    write_json(args.json, {"fingerprint": fingerprint(), "profile": args.profile, "models": args.models,
                           "runtimes": list(same), "rounds": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

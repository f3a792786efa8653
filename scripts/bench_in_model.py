"""Does a layer run slower inside the model than alone? The same modules, both ways, interleaved.

Takes a search's ``result.json`` (``--result``), its profile and database, and builds the
models it wrote (``--models``: ``spdy``, ``uniform``, ``global``, and ``dense`` for the
dense plan) in the profile's kernel formats. Per round, each model runs ``--calls`` forward
passes with a timer around every prunable layer (forward hooks), then every one of its
layer modules, the very object the model called, runs alone in a loop on the input it was
given in the model. Both times come from the same minute, so the machine's drift cancels.
The forward pass minus its layers is the rest (the base as the model runs it), printed
next to the profile's base (timed with every prunable layer a stand-in). Prints per model and per (format, sparsity class) the in-model time, the loop time and
their ratio, and each class's loop time now over the profile's entry (the drift since the
profile). ``--json FILE`` writes the numbers with the hardware fingerprint.

Then the drift itself: ``--drift SECONDS`` times one 1536x384 Linear (128 tokens) in torch's
dense GEMM and in spdy's formats at two sparsities, interleaved, every few seconds, and
reports how far each format's time over torch's moves.

``--random K`` takes instead the dense plan and the first ``K`` random models that ``spdy
profile --validate`` draws (``--seed``), magnitude-pruned, in the profile's formats; each model
is then printed with its predicted time and the stand-in base timed right after it.

    python scripts/bench_in_model.py --result OUT/result.json --profile P.json --database DB \\
        [--models spdy,uniform,global,dense] [--rounds 10] [--drift 240] [--json scripts/results/bench_in_model.json]
    python scripts/bench_in_model.py --profile P.json --random 4 [--rounds 6] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import spdy.kernels  # noqa: F401  - before torch: one OpenMP runtime
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import time_calls, write_json  # noqa: E402

from spdy import runtime
from spdy.api import as_bundle
from spdy.database import Database
from spdy.measure import _weights
from spdy.models.base import get_module
from spdy.profile import load_profile
from spdy.profilers import LayerChoice, backend_plan, get_backend
from spdy.profilers.base import STANDIN
from spdy.profilers.in_model import spanning_level_vectors
from spdy.profilers.profiler import level_plans


def sparsity_class(s: float) -> str:
    return "0" if s == 0 else "<0.8" if s < 0.8 else "<0.95" if s < 0.95 else ">=0.95"


def in_model_vs_loop(run: Any, names: list[str], rounds: int, calls: int, loop_calls: int = 20
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    """Per layer: median seconds inside the forward pass, median seconds alone in a loop; and the
    median seconds of a whole forward pass (timers included)."""
    mods = {n: get_module(run.model, n) for n in names}
    given: dict[str, Any] = {}
    start: dict[str, float] = {}
    inside: dict[str, list[float]] = {n: [] for n in names}
    alone: dict[str, list[float]] = {n: [] for n in names}
    passes: list[float] = []

    def pre(name: str) -> Any:
        def hook(_m: Any, args: tuple[Any, ...]) -> None:
            given[name] = args[0]
            start[name] = time.perf_counter()
        return hook

    def post(name: str) -> Any:
        def hook(_m: Any, _a: Any, _o: Any) -> None:
            inside[name].append(time.perf_counter() - start[name])
        return hook

    handles = [h for n, m in mods.items() for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
    try:
        with torch.inference_mode():
            run()
            for v in inside.values():
                v.clear()
            for _ in range(rounds):
                for _ in range(calls):
                    t0 = time.perf_counter()
                    run()
                    passes.append(time.perf_counter() - t0)
                for n, m in mods.items():
                    x = given[n]
                    for _ in range(3):
                        m(x)
                    t0 = time.perf_counter()
                    for _ in range(loop_calls):
                        m(x)
                    alone[n].append((time.perf_counter() - t0) / loop_calls)
    finally:
        for h in handles:
            h.remove()
    return (np.array([np.median(inside[n]) for n in names]), np.array([np.median(alone[n]) for n in names]),
            float(np.median(passes)))


def search_models(prof: Any, bundle: Any, res: dict[str, Any], database: Path, names: list[str]
                  ) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """``{name: (levels, backend plan)}`` of a search's models (``spdy``, ``uniform``, ``global``,
    ``dense`` for the dense plan), with the database's weights in the profile's formats."""
    t = prof.table
    weight = _weights(bundle, Database.open(database))
    models = {}
    for name in names:
        layers = res["layers"] if name in ("spdy", "dense") else res["baselines"][name]["layers"]
        levels = np.array([0 if name == "dense" else layers[n]["level"] for n in t.layers])
        models[name] = (levels, backend_plan(t.solution(levels), weight, bundle.inference.model))
    return models


def random_models(prof: Any, bundle: Any, k: int, seed: int) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """The dense plan and the first ``k`` random models of ``spdy profile --validate --seed SEED``."""
    t = prof.table
    vectors = np.vstack([np.zeros((1, len(t.layers)), dtype=np.int64),
                         spanning_level_vectors(len(t.layers), len(t.grid), k, seed)])
    return {("dense" if i == 0 else f"random{i - 1}"): (lv, plan)
            for i, (lv, plan) in enumerate(zip(vectors, level_plans(prof, bundle, vectors)))}


def base_time(run: Any, calls: int) -> float:
    """Median seconds of the stand-in base model's forward pass."""
    with torch.inference_mode():
        return float(np.median(time_calls(run, calls)))


def drift(seconds: float, threads: int) -> dict[str, Any]:
    """Each format's time over torch's dense GEMM, one 1536x384 layer, every few seconds."""
    runtime.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 384, generator=gen)

    def layer(sparsity: float, fmt: str) -> Any:
        lin = torch.nn.Linear(384, 1536)
        with torch.no_grad():
            w = lin.weight
            if sparsity:
                w[w.abs() <= w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
        return lin if fmt == "torch" else runtime.SparseLinear.from_linear(lin, format=fmt)

    mods = {"torch dense": layer(0, "torch"), "bcsr4x1 0%": layer(0, "bcsr4x1"), "bcsr4x1 80%": layer(0.8, "bcsr4x1"),
            "csr 80%": layer(0.8, "csr"), "csr-1t 80%": layer(0.8, "csr-1t"), "csr 93%": layer(0.93, "csr"),
            "csr-1t 93%": layer(0.93, "csr-1t")}

    def per_call(m: Any, n: int = 15) -> float:
        m(x)
        t0 = time.perf_counter()
        for _ in range(n):
            m(x)
        return (time.perf_counter() - t0) / n

    windows = []
    end = time.time() + seconds
    with torch.inference_mode():
        while time.time() < end:
            reps: dict[str, list[float]] = {k: [] for k in mods}
            for _ in range(5):
                for k, m in mods.items():
                    reps[k].append(per_call(m))
            windows.append({k: statistics.median(v) for k, v in reps.items()})
            time.sleep(3)
    ratios = {k: [w[k] / w["torch dense"] for w in windows] for k in mods if k != "torch dense"}
    out = {"windows": windows, "torch_dense_s": {"min": min(w["torch dense"] for w in windows),
                                                 "max": max(w["torch dense"] for w in windows)},
           "over_torch_dense": {k: {"median": statistics.median(r), "min": min(r), "max": max(r),
                                    "max_over_min": max(r) / min(r)} for k, r in ratios.items()}}
    print(f"\ndrift over {seconds:.0f} s ({len(windows)} windows; torch dense {out['torch_dense_s']['min'] * 1e6:.0f}-"
          f"{out['torch_dense_s']['max'] * 1e6:.0f} us):")
    for k, s in out["over_torch_dense"].items():
        print(f"  {k:12s} / torch dense: median {s['median']:.3f}, {s['min']:.3f}-{s['max']:.3f} (max/min {s['max_over_min']:.2f})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", type=Path, help="a spdy search result.json (MiniLM)")
    ap.add_argument("--profile", required=True, help="the profile that search used")
    ap.add_argument("--database", type=Path, help="the database that search used")
    ap.add_argument("--random", type=int, default=0, metavar="K",
                    help="instead of a search's models: the dense plan and the first K random models of "
                         "'spdy profile --validate' (magnitude-pruned, the profile's formats)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --random models (validate's --seed)")
    ap.add_argument("--models", default="spdy,uniform,global,dense")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=8, help="forward passes per round")
    ap.add_argument("--drift", type=float, default=0.0, metavar="SECONDS", help="then time the drift this long")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not args.random and (args.result is None or args.database is None):
        ap.error("give --result and --database (a search's models), or --random K")
    prof = load_profile(args.profile)
    t = prof.table
    res = json.loads(args.result.read_text()) if not args.random else {"model": prof.model, "settings": {}}
    threads = int(prof.settings.get("threads") or res["settings"]["threads"])
    bundle = as_bundle(res["model"])
    backend = get_backend(prof.backend, threads=threads)
    if args.random:
        models = random_models(prof, bundle, args.random, args.seed)
    else:
        models = search_models(prof, bundle, res, args.database, args.models.split(","))
    per_model: dict[str, Any] = {}
    base_run = backend.model_runner(bundle.inference, {n: LayerChoice(STANDIN) for n in t.layers})
    for name, (levels, plan) in models.items():
        sol = t.solution(levels)
        run = backend.model_runner(bundle.inference, plan)
        inside, alone, whole = in_model_vs_loop(run, list(t.layers), args.rounds, args.calls)
        base_now = base_time(base_run, args.rounds * args.calls)
        profiled = np.array([t.times[i, lv] for i, lv in enumerate(levels)])
        classes: dict[str, dict[str, Any]] = {}
        for i, f in enumerate(sol.formats):
            c = classes.setdefault(f"{f} {sparsity_class(t.grid.levels[levels[i]])}", {"layers": 0, "in_model_s": 0.0,
                                                                                         "alone_s": 0.0, "profile_s": 0.0})
            c["layers"] += 1
            c["in_model_s"] += float(inside[i])
            c["alone_s"] += float(alone[i])
            c["profile_s"] += float(profiled[i])
        print(f"\n{name}: the layers {inside.sum() * 1e3:.2f} ms in the model, {alone.sum() * 1e3:.2f} ms alone "
              f"(in/alone {inside.sum() / alone.sum():.3f}); the profile's entries {profiled.sum() * 1e3:.2f} ms; "
              f"the rest of the forward pass {(whole - inside.sum()) * 1e3:.2f} ms (the base with stand-ins now "
              f"{base_now * 1e3:.2f} ms, in the profile {t.base_s * 1e3:.2f} ms); the pass {whole * 1e3:.2f} ms, "
              f"predicted {t.predicted_time(levels) * 1e3:.2f} ms")
        for k, c in sorted(classes.items()):
            c["in_over_alone"] = c["in_model_s"] / c["alone_s"]
            c["alone_over_profile"] = c["alone_s"] / c["profile_s"]
            print(f"  {k:18s} {c['layers']:2d} layers: in the model {c['in_model_s'] * 1e3:6.2f} ms, alone "
                  f"{c['alone_s'] * 1e3:6.2f} ms (in/alone {c['in_over_alone']:.3f}); alone now / profile "
                  f"{c['alone_over_profile']:.2f}")
        per_model[name] = {"in_model_s": inside.tolist(), "alone_s": alone.tolist(), "profile_s": profiled.tolist(),
                           "formats": list(sol.formats), "levels": levels.tolist(), "classes": classes,
                           "in_over_alone": float(inside.sum() / alone.sum()), "forward_pass_s": whole,
                           "rest_of_pass_s": whole - float(inside.sum()), "profile_base_s": t.base_s,
                           "base_now_s": base_now, "predicted_s": t.predicted_time(levels)}
    payload: dict[str, Any] = {"fingerprint": backend.fingerprint(), "result": str(args.result),
                               "profile": str(args.profile), "rounds": args.rounds, "calls": args.calls,
                               "models": per_model}
    if args.drift > 0:
        payload["drift"] = drift(args.drift, threads)
    write_json(str(args.json) if args.json else None, payload)


if __name__ == "__main__":
    main()

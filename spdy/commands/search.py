"""``spdy search``: SPDY end to end - profile, database, sensitivity search, baselines, measurement."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXAMPLES = """\
examples:
  spdy search --model minilm --speedup 2x -o out/minilm-2x
  spdy search --model minilm --speedup 2.5x --max-evals 40 --seed 1 -o out/quick
  spdy search --model spdy.examples.digits:factory --speedup 2x -o out/digits
  spdy search --model minilm --speedup 2x --baseline uniform -o out/uniform-2x
  spdy search --model minilm --speedup 1.8x --speedup-percentile 10 -o out/p10  # 9 rounds in 10 at 1.8x
  spdy search --model minilm --speedup 2x --reference torch -o out/vs-torch  # 2x over torch eager
  spdy search --model minilm --backend torch-cuda --patterns 2:4 --speedup 1.5x -o out/gpu-2_4  # 2:4 per layer
  # two workers on one search (start the same command twice; the second only evaluates):
  spdy search --model minilm --speedup 2x --storage sqlite:///spdy.db --study s1 -o out/s1
  spdy search --model minilm --speedup 2x --storage sqlite:///spdy.db --study s1 --evaluate-only

--speedup is a speedup over the dense model in the --reference runtime, measured here
side by side with the pruned model: by default the faster of torch eager and ONNX
Runtime (the model exported, graph optimisations on, the same thread count); torch
eager where ONNX Runtime cannot run the model (a warning says so).

A missing latency profile or reconstruction database is measured/built first and
cached under $SPDY_CACHE (default ~/.cache/spdy) per model, calibration set and
hardware; --profile and --database use (or create) the given files instead.
Without --storage the search is kept in OUT/search.journal: re-running the same
command resumes a killed search where it stopped.

OUT/result.json holds the target and its reference, the predicted speedup (over the
backend's dense plan) and the measured speedup over each dense runtime, the calibration
loss (dense and pruned), the per-layer sparsities, the uniform and global-magnitude
baselines for the same budget, stage timings and the hardware fingerprint,
and "fit": SPDY's model, measured more than 1% short of the target (or 3% over), is
solved again for a budget corrected by its own measurement and re-measured
(--fit-rounds, default 2); the baselines then follow the budget it ended at;
OUT/model the pruned weights (spdy.apply(model, OUT) loads them); OUT/profile.png
the per-layer sparsities and where the time goes.
"""


def register(subparsers: Any) -> None:
    from spdy.baselines import BASELINES
    from spdy.cli import HelpFormatter
    from spdy.commands._common import add_method_flag, add_patterns_flag
    from spdy.models.base import LOSSES
    from spdy.reference import REFERENCES
    from spdy.sensitivity import AUTO_EVO_BELOW, AUTO_EVO_FROM, STRATEGIES

    p = subparsers.add_parser(
        "search",
        help="prune a model to a measured speedup target (SPDY end to end)",
        description="Find per-layer sparsities that make the model run --speedup times faster on this hardware "
        "with the least calibration loss, and write the pruned model.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default="minilm", help="built-in model name (minilm) or package.module:factory")
    p.add_argument("--speedup", required=True,
                   help="target end-to-end speedup over the dense model in the --reference runtime, e.g. 2.5x or 2.5")
    p.add_argument("--reference", default="fastest", choices=REFERENCES,
                   help="the dense runtime --speedup is over: fastest = the fastest of torch eager, torch eager in "
                   "channels_last (CNNs), torch.compile and ONNX Runtime (of those that run the model); torch = "
                   "torch eager; torch_channels_last = torch eager in channels_last; torch_compile = torch.compile; "
                   "onnxruntime = ONNX Runtime (an error where it cannot run the model)")
    p.add_argument("--backend", default="spdy-cpu", help="latency backend: spdy-cpu, spdy-cpu-compiled, ort-cpu, torch-cuda or torch-cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the runtime being profiled and measured (default: the usable cores)%(default).0s")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="latency profile JSON to use, measured into FILE if missing (default: cached)%(default).0s")
    p.add_argument("--database", default=None, metavar="DIR",
                   help="reconstruction database to use, built into DIR if missing (default: cached)%(default).0s")
    add_method_flag(p, "reconstruction method of a database built here")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage: sqlite:///file.db, an RDB URL, a journal file path, or :memory: "
                   "(default: OUT/search.journal)%(default).0s")
    p.add_argument("--study", default=None, help="study name; processes with the same storage and study share one "
                   "search (default: derived from model, target, strategy and seed)%(default).0s")
    p.add_argument("--max-evals", type=int, default=None, metavar="N",
                   help="full loss evaluations in all (default: the size of Algorithm 4 in full, k=100: "
                   "1 + k + ceil(delta*L)*k)%(default).0s")
    p.add_argument("--k", type=int, default=None,
                   help="Algorithm 4's k (random candidates, tries per local-search width)%(default).0s")
    p.add_argument("--delta", type=float, default=0.1, help="Algorithm 4's delta: largest local step is ceil(delta*L)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (results are reproducible per seed)")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="auto = evo from %d to %d evaluations, spdy+evo from there (and for the full "
                   "default budget), spdy below %d or with N:M patterns; spdy = Algorithm 4; evo = evolutionary "
                   "search over the levels themselves (children scored on 1/8, then 1/2, then all of the "
                   "calibration set; --max-evals counts full evaluations); spdy+evo = Algorithm 4 for half the "
                   "evaluations, then evo from its best; tpe, cmaes, random = Optuna samplers over the coefficients"
                   % (AUTO_EVO_FROM, AUTO_EVO_BELOW - 1, AUTO_EVO_FROM))
    add_patterns_flag(p, "also offer each layer these N:M patterns, e.g. 2:4, where the backend has a kernel for "
                      "them (the profile times them and the database reconstructs them)")
    p.add_argument("--baseline", default=None, choices=BASELINES,
                   help="skip the search and report this one-shot baseline alone%(default).0s")
    p.add_argument("--no-baselines", action="store_true", help="do not evaluate the baselines next to the search")
    p.add_argument("--no-measure", action="store_true", help="skip the end-to-end timing of the pruned models")
    p.add_argument("--fit-rounds", type=int, default=2, metavar="N",
                   help="after measuring, re-solve SPDY's model if it measured more than 1%% short of the target "
                   "(or 3%% over it) for a budget corrected by its own measurement, at most N times (0 = off); the "
                   "baselines then follow its budget")
    p.add_argument("--fit-evals", type=int, default=16, metavar="N",
                   help="calibration-loss evaluations SPDY spends on each new budget of the fit (the search's best "
                   "coefficients re-tried there, then local steps)")
    p.add_argument("--speedup-percentile", type=float, default=50.0, metavar="P",
                   help="which percentile of a model's speedups over the run's interleaved rounds must meet "
                   "--speedup: 50 = the median; 10 = nine rounds in ten, the machine's slow spells included")
    p.add_argument("--evaluate-only", action="store_true",
                   help="join a shared search as a worker: evaluate trials, write nothing")
    p.add_argument("--eval-threads", type=int, default=None,
                   help="torch threads for the calibration-loss evaluations (default: torch's)%(default).0s")
    p.add_argument("--calibration", type=int, default=None, metavar="N",
                   help="calibration samples for the built-in model (minilm: documents, default 128)%(default).0s")
    p.add_argument("--loss", default=None, choices=tuple(LOSSES),
                   help="calibration loss instead of the model's default (relative MSE to the dense outputs)%(default).0s")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="layers (glob on the module name) that stay dense; repeatable%(default).0s")
    p.add_argument("--force", action="store_true", help="use a --profile made on other hardware")
    p.add_argument("-o", "--output", default=None, metavar="OUT",
                   help="folder for result.json, model/ and profile.png (required unless --evaluate-only)%(default).0s")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spdy import dp
    from spdy.api import search
    from spdy.baselines import BASELINES
    from spdy.commands._common import ProgressBars
    from spdy.measure import MeasureConfig
    from spdy.sensitivity import SearchConfig

    _check_args(args)
    target = dp.parse_speedup(args.speedup)
    storage = args.storage
    if storage is None and args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        storage = str(Path(args.output) / "search.journal")
    if storage == ":memory:":
        storage = None
    model = _model(args)
    print(f"spdy search: {args.model} to {target:g}x over {_REFERENCE_WORDS[args.reference]} on {args.backend}"
          + (f" (baseline {args.baseline} only)" if args.baseline else "") + (f", storage {storage}" if storage else ""))
    bars = ProgressBars()
    try:
        res = search(
            model, speedup=target, backend=args.backend, threads=args.threads, profile=args.profile,
            database=args.database, method=args.method, storage=storage, study=args.study,
            config=SearchConfig(speedup=target, k=args.k, delta=args.delta, max_evals=args.max_evals, seed=args.seed,
                                strategy=args.strategy, patterns=args.patterns),
            measurement=MeasureConfig(measure=not args.no_measure, fit_rounds=args.fit_rounds,
                                      fit_evals=args.fit_evals, percentile=args.speedup_percentile),
            reference=args.reference,
            baselines=() if args.no_baselines else BASELINES, only_baseline=args.baseline,
            evaluate_only=args.evaluate_only, eval_threads=args.eval_threads,
            force=args.force, loss=args.loss, exclude=args.exclude if isinstance(model, str) else (),
            out=args.output, progress=bars,
        )
    finally:
        bars.close()
    if args.evaluate_only:
        print(f"worker done: the study {res.study!r} holds {res.n_evaluations} evaluations; best loss {res.calibration_loss:.5g}")
        return 0
    _print_outcome(res, args)
    return 0


_REFERENCE_WORDS = {"fastest": "the fastest dense runtime", "torch": "torch eager", "onnxruntime": "ONNX Runtime"}


def _check_args(args: argparse.Namespace) -> None:
    from spdy.errors import InvalidInputError

    if args.output is None and not args.evaluate_only:
        raise InvalidInputError("give an output folder with -o OUT (or --evaluate-only to join a shared search)")
    for flag, val in (("--max-evals", args.max_evals), ("--k", args.k), ("--threads", args.threads),
                      ("--eval-threads", args.eval_threads), ("--calibration", args.calibration)):
        if val is not None and val < 1:
            raise InvalidInputError(f"{flag} must be >= 1; got {val}")
    if args.fit_rounds < 0:
        raise InvalidInputError(f"--fit-rounds must be >= 0 (0 turns the fit off); got {args.fit_rounds}")
    if args.fit_evals < 1:
        raise InvalidInputError(f"--fit-evals must be >= 1; got {args.fit_evals}")


def _model(args: argparse.Namespace) -> Any:
    """``--model`` as the name the API loads, or the loaded bundle when ``--calibration`` sets its data."""
    from spdy.errors import InvalidInputError

    if args.calibration is None:
        return args.model
    if args.model != "minilm":
        raise InvalidInputError("--calibration applies to the built-in minilm model; a factory chooses its own data")
    from spdy.models.base import load_model

    return load_model(args.model, exclude=args.exclude, n_calibration=args.calibration)


def _state_line(by_state: dict[str, Any] | None, reference: str, threads: int | None) -> str:
    """What the rounds' states say about the measured speedup (see ``Outcome.speedups_by_state``):
    ONNX Runtime's gain from its extra threads, and with two states the speedup over the
    reference in each; empty without ONNX Runtime on one thread in every round."""
    from spdy.profilers.dense_runtimes import LABELS

    if not by_state:
        return ""
    n = f"{threads} threads" if threads else "its threads"
    if "all" in by_state:
        k = by_state["all"]["rounds"]
        alike = f"alike in all {k}" if k >= 4 else f"{k} rounds, too few to tell two states apart"
        return f"ONNX Runtime gained {by_state['all']['gain']:.2f}x from {n} over 1 in these rounds ({alike})"
    gains = by_state["gains"]
    if "fast" not in by_state or "slow" not in by_state:
        return (f"the machine changed state during these rounds (ONNX Runtime gained {min(gains):.2f}-{max(gains):.2f}x "
                f"from {n} over 1; the CPUs slow each other in spells), and ONNX Runtime's blocks and the plans' did "
                "not change together: the speedups over ONNX Runtime mix the two states. Time the deployed model "
                "against it again on a quieter machine to know the speedup of each.")
    fast, slow = by_state["fast"], by_state["slow"]
    over = LABELS.get(reference, reference)
    f_s, s_s = fast["speedup_by_runtime"].get(reference), slow["speedup_by_runtime"].get(reference)
    both = f": over {over} {f_s:.2f}x in the fast rounds, {s_s:.2f}x in the slow ones" if f_s and s_s else ""
    mixed = by_state.get("mixed", {}).get("rounds", 0)
    left = f"; {mixed} round{'s' if mixed > 1 else ''} with the blocks in different states left out" if mixed else ""
    return (f"the machine ran in two states: in {slow['rounds']} of {len(gains)} rounds ONNX Runtime gained only "
            f"{slow['gain']:.2f}x from {n} over 1 ({fast['gain']:.2f}x in {fast['rounds']}; the CPUs slowed each "
            f"other){both}{left}. Deployed, expect the fast rounds' figure where the CPUs do not contend.")


def _print_outcome(res: Any, args: argparse.Namespace) -> None:
    """The table of SPDY and the baselines, the fit, the stage times and the warnings."""
    from spdy.api import Outcome
    from spdy.profilers.dense_runtimes import DENSE_PLAN, LABELS, RUNTIMES
    from spdy.reference import Reference

    ref = Reference.from_json(res.reference) if res.reference else None
    rows: list[tuple[str, Outcome | str]] = [(res.result.method, res.result), *res.baselines.items()]
    pct = args.speedup_percentile
    label = "median" if pct == 50 else f"p{pct:g}"
    first = ref.runtime if ref else DENSE_PLAN
    over = sorted((rt for rt in (*RUNTIMES, DENSE_PLAN) if rt in res.result.runtime_samples), key=lambda rt: rt != first)
    if ref is not None:
        print(f"\nspeedups {ref.describe()}")
    print(f"\n{'profile':<10} {'measured':>10} {'p10-p90 (rounds)':>20}"
          + "".join(f" {'vs ' + LABELS[rt]:>18}" for rt in over)
          + f" {'predicted*':>11} {'calib. loss':>12}")
    print(f"{'dense':<10} {'':>10} {'':>20}" + "".join(f" {'':>18}" for _ in over) + f" {'1.00x':>11} {res.dense_loss:12.5g}")
    for name, o in rows:
        if isinstance(o, str):
            print(f"{name:<10} {'infeasible':>10}   {o[:60]}")
            continue
        meas = f"{o.measured_speedup:9.2f}x" if o.measured_speedup is not None else f"{'-':>10}"
        s = o.speedup_summary()
        spread = f"{s['p10']:.2f}-{s['p90']:.2f}x ({s['rounds']})" if s else ""
        cols = "".join(f" {_with_spread(o, rt):>18}" for rt in over)
        print(f"{name:<10} {meas} {spread:>20}{cols} {o.solution.predicted_speedup:10.2f}x {o.calibration_loss:12.5g}")
    print(f"(measured: the {label} of every round this model was timed in, over {ref.label if ref else 'the dense plan'}; "
          "vs each dense runtime the same, p10-p90 in brackets; *predicted: the latency model's, over the dense plan)")
    line = _state_line(res.result.speedups_by_state(), ref.runtime if ref else DENSE_PLAN, res.settings.get("threads"))
    if line:
        print(line)
    for f in res.fit:
        over = f" [over {LABELS[f['reference']]}, after the switch]" if f.get("reference") in LABELS else ""
        if f.get("matched"):
            same = f.get("spdy_measured_same_rounds")
            spdy_t = f.get("spdy_dp_target", f["dp_target"])
            short = "" if abs(spdy_t - f["dp_target"]) <= 1e-9 * spdy_t else f" (SPDY's: {spdy_t:.3f}, out of its reach)"
            print(f"{f['method']}: solved for DP target {f['dp_target']:.3f}{short} (was {f['from_dp_target']:.3f}) "
                  f"and measured side by side with SPDY's model: {f['measured']:.2f}x, loss {f['calibration_loss']:.5g}"
                  + (f" (SPDY in the same rounds: {same:.2f}x)" if same is not None else "") + over)
            continue
        print(f"fit {f['method']}: measured {f['from_measured']:.2f}x (again: {f['remeasured']:.2f}x) -> DP target "
              f"{f['from_dp_target']:.3f} -> {f['dp_target']:.3f}: measured {f['measured']:.2f}x, loss "
              f"{f['calibration_loss']:.5g}, " + ("taken" if f["accepted"] else "not taken") + f" ({f['why']})" + over)
    _print_patterns(res)
    if res.dense_runtime_s:
        print("dense model measured: " + ", ".join(f"{LABELS[rt]} {t * 1e3:.2f} ms" for rt, t in res.dense_runtime_s.items())
              + f" (the {LABELS[DENSE_PLAN]}: {res.backend}'s own, every layer unpruned in the format the profile found "
              "fastest)")
    elif res.dense_measured_s:
        print(f"dense model measured {res.dense_measured_s * 1e3:.2f} ms on {res.backend}")
    print("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in res.stage_s.items()))
    strategy = res.settings.get("strategy")
    if strategy and res.n_evaluations:
        asked = res.settings.get("strategy_asked")
        print(f"search: {strategy}" + (f" (--strategy {asked})" if asked and asked != strategy else "")
              + f", {res.n_evaluations} full loss evaluations")
    if res.per_evaluation_ms:
        print(f"per evaluation ({res.n_evaluations}): " + ", ".join(f"{k} {v:.1f} ms" for k, v in res.per_evaluation_ms.items()))
    for w in res.warnings:
        print("\n" + "!" * 78 + f"\nWARNING: {w}\n" + "!" * 78)
    print(f"wrote {args.output}/result.json, {args.output}/model, {args.output}/profile.png")


def _with_spread(o: Any, runtime: str) -> str:
    """``o``'s speedup over ``runtime`` and its 10th-90th percentile over the rounds."""
    s = o.speedup_summary(runtime)
    sp = o.runtime_speedups.get(runtime)
    return f"{sp:.2f}x ({s['p10']:.2f}-{s['p90']:.2f})" if s and sp is not None else "-"


def _print_patterns(res: Any) -> None:
    """One line per N:M pattern asked for: how many layers had it as a choice, how many took it."""
    offered = res.settings.get("patterns") or {}
    counts = res.result.solution.pattern_counts()
    n_layers = len(res.result.solution.layers)
    for p, n in offered.items():
        if n == 0:
            print(f"N:M {p}: not a choice on {res.backend} (no layer has a {p} kernel there, or a {p} weight in the "
                  "database); the search used the grid's levels alone")
        else:
            print(f"N:M {p}: a choice for {n} of {n_layers} layers, taken by {counts.get(p, 0)}")

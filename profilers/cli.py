"""``spdy profile``: measure a model's latency table on a backend, and check it end to end."""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXAMPLES = """\
examples:
  spdy profile --model minilm --backend spdy-cpu -o profile.json
  spdy profile --model minilm --backend ort-cpu --threads 1 --validate 10 -o minilm-ort1.json
  spdy profile --model mypkg.models:build --backend spdy-cpu --grid-levels 0 0.5 0.7 0.9 0.95 -o p.json
  spdy profile --model minilm --backend spdy-cpu --from profile.json --validate 10 -o profile.json
  spdy profile --model minilm --backend torch-cuda --dtype float16 --patterns 2:4 -o minilm-gpu.json

The profile holds, per prunable layer and sparsity level, the time of the fastest
kernel format the backend's runtime offers, plus the base time (everything else,
measured with each prunable layer replaced by a zero-cost stand-in). --validate K
draws K random per-layer levels, runs each pruned model end to end and records
predicted against measured time in the profile; the same round times the dense
model in torch eager and in ONNX Runtime (exported, graph optimisations on, the
same thread count), and each model's speedup over both is recorded and printed. --from re-validates an existing
profile; one made for another model or on other hardware is refused unless --force.
--patterns also times each layer with an N:M weight (2:4: N kept of every M
consecutive inputs) where the backend has a kernel for it (torch-cuda: 2:4 on
Linear layers in float16/bfloat16; no backend has a 4:8 kernel).
Backends: spdy-cpu (spdy's sparse CPU kernels), spdy-cpu-compiled (the same, the rest
of the model compiled by torch.compile), ort-cpu (ONNX Runtime CPU), torch-cuda
(NVIDIA GPU), torch-cpu (PyTorch dense and CSR).
"""


def register(subparsers: Any) -> None:
    from spdy.cli import HelpFormatter
    from spdy.commands._common import add_dtype_flag, add_grid_flag, add_patterns_flag

    p = subparsers.add_parser(
        "profile",
        help="measure per-layer, per-sparsity latencies of a model on this hardware",
        description="Measure a latency profile: per prunable layer and sparsity level, the time of the fastest "
        "kernel format, plus the base time of everything else, on this machine.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="built-in model name (minilm) or package.module:factory%(default).0s")
    p.add_argument("--backend", default="spdy-cpu", help="latency backend: spdy-cpu, spdy-cpu-compiled, ort-cpu, torch-cuda or torch-cpu")
    p.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: the usable cores)%(default).0s")
    p.add_argument("--validate", type=int, default=0, metavar="K",
                   help="time K random pruned models end to end and record predicted vs measured; the same "
                        "round times the profile's state probes again, to tell the machine's drift from the "
                        "table's error")
    p.add_argument("--seed", type=int, default=0, help="seed of the random level vectors for --validate")
    add_grid_flag(p)
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="layers (glob on the module name) that stay dense; their time goes into the base; repeatable%(default).0s")
    p.add_argument("--passes", type=int, default=None,
                   help="passes over all layers; each level's time is the median over passes (default: 3)%(default).0s")
    p.add_argument("--quick", action="store_true", help="few repeats, one pass: a smoke test, not a profile to trust")
    add_patterns_flag(p, "also time N:M pattern choices, e.g. 2:4 (where the backend has a kernel)")
    add_dtype_flag(p)
    p.add_argument("--from", dest="from_profile", default=None, metavar="PROFILE",
                   help="re-validate this existing profile instead of measuring a new one%(default).0s")
    p.add_argument("--force", action="store_true",
                   help="use a --from profile made for another model signature or on other hardware")
    p.add_argument("-o", "--output", required=True, help="profile JSON to write%(default).0s")
    p.set_defaults(func=run)


def _policy(args: argparse.Namespace) -> Any:
    import dataclasses

    from spdy.errors import InvalidInputError
    from spdy.profilers import QUICK_POLICY, TimingPolicy

    policy = QUICK_POLICY if args.quick else TimingPolicy()
    if args.passes is not None:
        if args.passes < 1:
            raise InvalidInputError(f"--passes must be >= 1; got {args.passes}")
        policy = dataclasses.replace(policy, passes=args.passes)
    return policy


def run(args: argparse.Namespace) -> int:
    import spdy.profilers  # noqa: F401  - first: the spdy kernels must load before torch
    from spdy.commands._common import ProgressBars, grid_from_levels
    from spdy.errors import InvalidInputError
    from spdy.models.base import load_model
    from spdy.profile import load_profile, save_profile
    from spdy.profilers import get_backend, profile_model, validate

    if args.validate < 0:
        raise InvalidInputError(f"--validate must be >= 0; got {args.validate}")
    bundle = load_model(args.model, exclude=args.exclude)
    options = {"dtype": args.dtype} if args.dtype else {}
    if options and not args.backend.startswith("torch-"):
        raise InvalidInputError(f"--dtype applies to the torch backends (torch-cuda, torch-cpu); not to {args.backend}")
    backend = get_backend(args.backend, threads=args.threads, policy=_policy(args), **options)
    specs = bundle.layers()
    t0 = time.perf_counter()
    if args.from_profile:
        profile = load_profile(args.from_profile, specs=specs, fingerprint=backend.fingerprint(), force=args.force)
        if profile.backend != backend.name:
            raise InvalidInputError(
                f"{args.from_profile} was measured with backend {profile.backend!r}; pass --backend {profile.backend}"
            )
        print(f"loaded {args.from_profile}: {len(profile.table.layers)} layers x {len(profile.table.grid)} levels")
    else:
        grid = grid_from_levels(args.grid_levels)
        print(f"profiling {bundle.name} on {backend.name} ({backend.threads} threads): "
              f"{len(specs)} layers x {len(grid)} levels, {backend.policy.passes} passes")
        bars = ProgressBars()
        try:
            profile = profile_model(bundle, backend, grid, specs=specs, progress=bars.stage("profile"),
                                    patterns=args.patterns)
        finally:
            bars.close()
        print(f"measured in {time.perf_counter() - t0:.0f} s")
    t = profile.table
    if args.validate:
        from spdy.profilers.dense_runtimes import LABELS, dense_runtimes

        runtimes = dense_runtimes(backend, bundle.inference)
        for rt, why in runtimes.unavailable.items():
            print(f"{LABELS[rt]} is not measured: {why}")
        bars = ProgressBars()
        bar = bars.stage("validate")
        bar(0, args.validate, "end-to-end runs")
        try:
            records = validate(profile, bundle, backend, k=args.validate, seed=args.seed, progress=bar,
                               runtimes=runtimes)
        finally:
            bars.close()
        profile = profile.with_validation(records)
    save_profile(profile, args.output)
    dense_measured = profile.settings.get("dense_measured_s")
    print(f"base {t.base_s * 1e3:.2f} ms, dense total {t.dense_total_s * 1e3:.2f} ms (predicted)"
          + (f", {dense_measured * 1e3:.2f} ms (measured)" if dense_measured else "")
          + f", max speedup {t.max_speedup():.2f}x")
    stats = backend.stats
    if stats["discarded"]:
        print(f"{stats['discarded']} of {stats['samples'] + stats['discarded']} samples discarded: other processes "
              "competed for the CPU" + (" (gave up waiting; re-run on a quiet machine)" if stats["busy_giveups"] else ""))
    if profile.validation:
        _print_validation(profile)
    print(f"wrote {args.output}")
    return 0


def _print_validation(profile: Any) -> None:
    from spdy.profilers import signed_validation_error, state_validation_errors, validation_error
    from spdy.profilers.profiler import STATE_ANCHORS
    from spdy.profilers.dense_runtimes import LABELS, ONNXRUNTIME, RUNTIMES, STATE_PROBE

    t = profile.table
    over = [rt for rt in RUNTIMES if f"speedup_over_{rt}" in profile.validation[0]]
    print(f"{'predicted':>10} {'measured':>9} {'error':>7}" + "".join(f" {'vs ' + LABELS[rt]:>16}" for rt in over)
          + "   (predicted, measured: speedup over the dense plan; error: predicted / measured time - 1)")
    for r in profile.validation:
        err = r.get("error", r["predicted_s"] / r["measured_s"] - 1)
        pred = r.get("predicted_speedup", t.dense_total_s / r["predicted_s"])
        meas = r.get("measured_speedup", float("nan"))
        print(f"{pred:9.2f}x {meas:8.2f}x {err * 100:+6.1f}%" + "".join(f" {r[f'speedup_over_{rt}']:15.2f}x" for rt in over))
    if over:
        r = profile.validation[-1]
        one, many = r.get(f"{STATE_PROBE}_dense_s"), r.get(f"{ONNXRUNTIME}_dense_s")
        gain = (f", {LABELS[STATE_PROBE]} {one * 1e3:.2f} ms (its gain from {profile.settings.get('threads')} threads: "
                f"{one / many:.2f}x)") if one and many else ""
        print("dense model in the same round: " + ", ".join(
            [f"the dense plan {r['dense_measured_s'] * 1e3:.2f} ms"] + [f"{LABELS[rt]} {r[f'{rt}_dense_s'] * 1e3:.2f} ms"
                                                                          for rt in over]) + gain)
    err = validation_error(profile.validation)
    if not math.isnan(err):
        print(f"median |predicted - measured| / measured: {err * 100:.1f}% (signed: "
              f"{signed_validation_error(profile.validation) * 100:+.1f}%) over {len(profile.validation)} models")
    state_err, state_signed = state_validation_errors(profile.validation)
    if not math.isnan(state_err):
        r = profile.validation[-1]
        print(f"with the machine's state read in the same round (the dense model and {STATE_ANCHORS} random ones: time = "
              f"{r['state_scale']:.3f} x the table's {r['state_offset_s'] * 1e3:+.2f} ms): median "
              f"{state_err * 100:.1f}% (signed {state_signed * 100:+.1f}%)")
    shift = profile.validation[-1].get("state_shift")
    if shift is not None:
        each = profile.validation[-1].get("probe_shifts") or []
        ratios = profile.validation[-1].get("probe_ratios") or []
        one_by_one = ", ".join(f"{x:.3f}x" for _r, x in sorted(zip(ratios, each)))
        print(f"state probes: models the profile timed now take {shift:.3f}x the share of the dense plan they took "
              f"then in the median (the machine's state moved {abs(shift - 1) * 100:.1f}%"
              f"{', toward sparse kernels' if shift < 1 else ', against sparse kernels' if shift > 1 else ''}"
              f"{f'; one by one, sparsest first: {one_by_one}' if one_by_one else ''})")
    base_now = profile.validation[-1].get("base_measured_s")
    if base_now:
        print(f"base model now {base_now * 1e3:.2f} ms vs {t.base_s * 1e3:.2f} ms in the profile "
              f"({(base_now / t.base_s - 1) * 100:+.1f}%: the machine's drift since the profile)")
    line = dense_drift_line(profile.validation[-1].get("dense_measured_s"), profile.settings.get("dense_measured_s"))
    if line:
        print(line)


#: How far the dense plan's time may move between the profile and the validation round before
#: the validation says that the plain error compares two states of the machine.
DENSE_DRIFT_NOTE = 0.10


def dense_drift_line(now_s: float | None, then_s: float | None) -> str:
    """The dense plan's time in the validation round against the profile's, and when it moved by
    more than :data:`DENSE_DRIFT_NOTE`, which of the two errors applies; empty without both times."""
    if not now_s or not then_s:
        return ""
    drift = now_s / then_s - 1
    line = f"dense plan now {now_s * 1e3:.2f} ms vs {then_s * 1e3:.2f} ms in the profile ({drift * 100:+.1f}%)"
    if abs(drift) > DENSE_DRIFT_NOTE:
        line += (": the machine is in another state than when profiled (on two threads, e.g. its two CPUs slowing "
                 "each other), and pruned models move unlike the dense one between states, so the plain error "
                 "compares the two states; the error with the state read is the one that applies now")
    return line

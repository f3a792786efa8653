"""``spdy solve``: the DP on a latency table, as a command."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from spdy import dp
from spdy.errors import InvalidInputError
from spdy.profile import Profile, load_profile
from spdy.types import Solution

log = logging.getLogger(__name__)

EXAMPLES = """\
examples:
  spdy solve --timings rn50_unstr.txt --speedup 2x                 # a table in SPDY's published format
  spdy solve --timings profile.json --speedup 2.5x --buckets 100000 --json
  spdy solve --timings profile.json --speedup 3 --errors errors.json

--timings takes SPDY's reference text format or an spdy profile JSON.
--errors takes JSON {"layer name": [one score per level], ...} or a text matrix
(one row per layer, one column per level). Without it, SPDY's prior with every
coefficient 1 is used: e[l][i] = (i / (|S| - 1))^2.
"""


#: The JSON form of an errors file, as messages describe it.
JSON_ERRORS_FORM = '{"layer name": [one score per level], ...}'


def read_errors(path: str | Path, profile: Profile) -> np.ndarray:
    """Error scores [L, S] for the profile's layers, from JSON (by layer name) or a text matrix."""
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"errors file {str(p)!r} does not exist")
    layers = profile.table.layers
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(
                f"errors file {str(p)!r} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                f"expected {JSON_ERRORS_FORM} or a text matrix; fix the file or pass another --errors"
            ) from None
        data = data.get("errors", data)
        if not isinstance(data, dict):
            raise InvalidInputError(f"errors file {str(p)!r} holds {type(data).__name__} under 'errors'; "
                                    f"expected {JSON_ERRORS_FORM}")
        missing = [n for n in layers if n not in data]
        if missing:
            raise InvalidInputError(f"errors file {p} has no scores for layers {missing[:5]} (of {len(missing)})")
        try:
            return np.array([data[n] for n in layers], dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInputError(f"errors file {str(p)!r} holds scores that are not one number per level for "
                                    f"every layer; expected {JSON_ERRORS_FORM}") from None
    try:
        arr = np.loadtxt(p, ndmin=2, delimiter="," if "," in text else None)
    except ValueError as exc:
        raise InvalidInputError(f"errors file {p}: not a numeric matrix ({exc})") from None
    return arr


def solution_json(sol: Solution, profile: Profile, speedup: float, buckets: int) -> dict:
    out = sol.to_json()
    t = profile.table
    out.update(
        target_speedup=speedup,
        buckets=buckets,
        budget_s=t.budget_for(speedup),
        dense_total_s=t.dense_total_s,
        base_s=t.base_s,
        source=profile.backend,
    )
    return out


def run(args: argparse.Namespace) -> int:
    speedup = dp.parse_speedup(args.speedup)
    profile = load_profile(args.timings)
    t = profile.table
    errors = read_errors(args.errors, profile) if args.errors else dp.prior_errors(len(t.layers), len(t.grid))
    dp.warmup()  # JIT compile (or cache load) is not part of solve_ms
    sol = dp.solve(t, errors, speedup, buckets=args.buckets)
    if args.json:
        print(json.dumps(solution_json(sol, profile, speedup, args.buckets), indent=2))
        return 0
    print(f"{len(t.layers)} layers x {len(t.grid)} levels, target {speedup:g}x, {args.buckets} buckets")
    print(f"{'layer':<40} {'sparsity':>8} {'dense ms':>9} {'chosen ms':>9}")
    for i, name in enumerate(sol.layers):
        lv = sol.levels[i]
        print(f"{name:<40} {sol.sparsities[i]:>8.4f} {t.times[i, 0] * 1e3:>9.4f} {t.times[i, lv] * 1e3:>9.4f}")
    print(
        f"predicted {sol.predicted_time_s * 1e3:.4f} ms of {t.dense_total_s * 1e3:.4f} ms dense "
        f"= {sol.predicted_speedup:.4f}x (target {speedup:g}x); total error {sol.total_error:.6g}; "
        f"solve {sol.solve_ms:.2f} ms"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from spdy.cli import HelpFormatter

    p = sub.add_parser(
        "solve",
        help="pick per-layer sparsities for a speedup with the DP",
        description="Run SPDY's dynamic program on a latency table: the per-layer sparsities with the least "
        "summed error whose predicted time meets the speedup target.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--timings", required=True, metavar="FILE", help="latency table: reference .txt or profile .json")
    p.add_argument("--speedup", required=True, help="target speedup over the dense model, e.g. 2.5x or 2.5")
    p.add_argument("--buckets", type=int, default=dp.DEFAULT_BUCKETS, help="time discretisation of the DP")
    p.add_argument("--errors", metavar="FILE", help="error scores per layer and level (default: SPDY's prior)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)

"""``spdy database build|verify|ls``: the reconstruction database, as commands."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import numpy as np

from spdy.commands._common import NO_DEFAULT as _NO_DEFAULT
from spdy.errors import DatabaseError, InvalidInputError

log = logging.getLogger(__name__)

BUILD_EXAMPLES = """\
examples:
  spdy database build --model minilm -o db/minilm-obs
  spdy database build --model minilm --method exact -o db/minilm-exact --threads 2
  spdy database build --model mypkg.models:resnet --exclude 'fc' -o db/resnet
  spdy database build --model minilm --patterns 2:4,4:8 -o db/minilm-obs

--patterns adds N:M semi-structured reconstructions (N kept of every M consecutive
input weights per row, same method) next to the grid levels, for GPU targets with
2:4 kernels; layers whose input size is not a multiple of M are recorded as
skipped. Adding patterns to an existing database rebuilds its layers with them.

The build resumes: run the same command again after an interruption and it
continues at the first missing layer. A folder holding a database for another
model, calibration set, grid or method is refused unless --overwrite is given.
"""

VERIFY_EXAMPLES = """\
examples:
  spdy database verify db/minilm-obs

Checks the manifest, every layer file's sha256, that every level decodes and
that every level has exactly its sparsity. Exit code 0 if all is fine, 1 on any
problem (each printed on its own line).
"""

LS_EXAMPLES = """\
examples:
  spdy database ls db/minilm-obs
  spdy database ls db/minilm-obs --levels
  spdy database ls db/minilm-obs --json > errors.json

Shows each layer's size on disk and its relative reconstruction error
||X W^T - X What^T||^2 / ||X W^T||^2 at a few levels; --levels adds the mean
error and the encodings per level; --json prints {"errors": {layer: [per level]}}
(the format 'spdy solve --errors' reads) plus the grid and sizes.
"""


def _formatter() -> Any:
    from spdy.cli import HelpFormatter

    return HelpFormatter


def register(subparsers: argparse._SubParsersAction) -> None:
    from spdy.commands._common import add_grid_flag, add_method_flag, add_patterns_flag

    fmt = _formatter()
    p = subparsers.add_parser(
        "database",
        help="build, check and inspect the reconstruction database",
        description="The reconstruction database: every prunable layer pruned and reconstructed at every grid level.",
        epilog="examples:\n  spdy database build --model minilm -o db/\n  spdy database verify db/\n  spdy database ls db/\n",
        formatter_class=fmt,
    )
    sub = p.add_subparsers(dest="database_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    b = sub.add_parser(
        "build",
        help="reconstruct every layer at every sparsity level (resumable)",
        description="Capture H = sum x^T x per layer on the calibration set, prune and reconstruct every layer "
        "at every level of the grid, store all levels compactly.",
        epilog=BUILD_EXAMPLES,
        formatter_class=fmt,
    )
    b.add_argument("--model", required=True, help="built-in model name (minilm) or package.module:factory" + _NO_DEFAULT)
    b.add_argument("-o", "--output", required=True, metavar="DIR", help="database folder (created; resumed if it holds a partial build)" + _NO_DEFAULT)
    add_method_flag(b, "obs: SparseGPT-style OBS sweep; exact: OBS masks + exact least-squares refit (about 2.5x "
                    "slower); magnitude: no refit")
    b.add_argument("--damp", type=float, default=None,
                   help="diagonal damping as a fraction of mean(diag H) (default: 0.01 for obs, 0 for exact)" + _NO_DEFAULT)
    b.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="layer names that stay dense (repeatable)" + _NO_DEFAULT)
    add_grid_flag(b, "; a single whole number N, the old form, is read as N levels between --min-sparsity and "
                  "--max-sparsity and is deprecated")
    b.add_argument("--min-sparsity", type=float, default=0.40, help="sparsity of level 1 of SPDY's grid (no --grid-levels)")
    b.add_argument("--max-sparsity", type=float, default=0.99, help="sparsity of the last level of SPDY's grid (no --grid-levels)")
    b.add_argument("--threads", type=int, default=None, help="torch and Numba threads (default: torch's choice)" + _NO_DEFAULT)
    add_patterns_flag(b, "also reconstruct these N:M patterns, e.g. 2:4,4:8 (default: none)")
    b.add_argument("--overwrite", action="store_true", help="replace a database for another setup in DIR")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("verify", help="check a database for missing or corrupted files (exit 1 on any problem)",
                       description="Check a reconstruction database.", epilog=VERIFY_EXAMPLES, formatter_class=fmt)
    v.add_argument("directory", metavar="DIR")
    v.set_defaults(func=cmd_verify)

    ls = sub.add_parser("ls", help="list layers, levels, errors and sizes",
                        description="Show what a reconstruction database holds.", epilog=LS_EXAMPLES, formatter_class=fmt)
    ls.add_argument("directory", metavar="DIR")
    ls.add_argument("--levels", action="store_true", help="also show one line per level")
    ls.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ls.set_defaults(func=cmd_ls)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_build(args: argparse.Namespace) -> int:
    import time

    import torch

    from spdy.commands._common import grid_from_levels
    from spdy.database.store import build_database
    from spdy.grid import spdy_grid
    from spdy.models.base import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise InvalidInputError(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    grid = grid_from_levels(args.grid_levels, spdy_grid(lo=args.min_sparsity, hi=args.max_sparsity),
                            count_form=lambda n: spdy_grid(n, args.min_sparsity, args.max_sparsity))
    bundle = load_model(args.model, exclude=args.exclude)
    t0 = time.perf_counter()
    db = build_database(
        bundle, args.output, grid=grid, method=args.method, damp=args.damp,
        progress=not args.no_progress, overwrite=args.overwrite, patterns=args.patterns,
    )
    dt = time.perf_counter() - t0
    total, dense = db.total_bytes(), db.dense_bytes()
    print(
        f"{db.path}: {len(db.layers)} layers x {len(db.grid)} levels ({db.method}) in {dt:.1f} s; "
        f"{_size(total)} on disk ({dense / max(total, 1):.1f}x smaller than dense fp32 x levels, {_size(dense)})"
    )
    for pat in db.patterns:
        skipped = db.pattern_skipped(pat)
        print(f"pattern {pat}: {len(db.layers) - len(skipped)} layers"
              + (f"; {len(skipped)} skipped (first: {next(iter(skipped))}: {next(iter(skipped.values()))})" if skipped else ""))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from spdy.database.store import Database

    try:
        db = Database.open(args.directory, require_complete=False)
    except DatabaseError as exc:
        print(f"FAIL {args.directory}: {exc}")
        return 1
    problems = db.verify()
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        print(f"{len(problems)} problem(s) in {db.path}")
        return 1
    print(f"ok {db.path}: {len(db.layers)} layers x {len(db.grid)} levels ({db.method}), {_size(db.total_bytes())}, all checksums match")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from spdy.database.store import Database

    db = Database.open(args.directory, require_complete=False)
    sizes = db.file_bytes()
    grid = db.grid.as_array()
    if args.json:
        out = {
            "path": str(db.path),
            "model": db.model,
            "method": db.method,
            "complete": db.complete,
            "grid": db.grid.to_json(),
            "errors": {n: [None if not np.isfinite(x) else float(x) for x in db.errors[i]] for i, n in enumerate(db.layers)},
            "patterns": list(db.patterns),
            "pattern_errors": {
                n: {p: None if not np.isfinite(db.pattern_errors[i, k]) else float(db.pattern_errors[i, k])
                    for k, p in enumerate(db.patterns)}
                for i, n in enumerate(db.layers)
            },
            "bytes": sizes,
            "total_bytes": db.total_bytes(),
            "dense_bytes": db.dense_bytes(),
        }
        print(json.dumps(out, indent=2))
        return 0
    total, dense = db.total_bytes(), db.dense_bytes()
    state = "complete" if db.complete else f"INCOMPLETE ({len(db.missing)} layers missing)"
    print(f"{db.path}: model {db.model}, method {db.method} (damp {db.manifest.get('damp')}), "
          f"{len(db.layers)} layers x {len(db.grid)} levels, {state}")
    print(f"disk {_size(total)}; dense fp32 x levels would be {_size(dense)} ({dense / max(total, 1):.1f}x)")
    show = sorted({int(np.argmin(np.abs(grid - s))) for s in (0.5, 0.7, 0.9, 0.99) if len(grid) > 1} - {0})
    head = "".join(f"{'err@' + format(grid[j] * 100, '.0f') + '%':>10}" for j in show)
    head += "".join(f"{'err@' + p:>10}" for p in db.patterns)
    width = max([5] + [len(n) for n in db.layers])
    print(f"{'layer':<{width}} {'shape':>14} {'size':>10}{head}")
    for i, name in enumerate(db.layers):
        shape = "x".join(str(x) for x in db.specs[i].weight_shape)
        if name not in sizes:
            print(f"{name:<{width}} {shape:>14} {'missing':>10}")
            continue
        errs = "".join(f"{db.errors[i, j]:>10.4f}" for j in show)
        errs += "".join(f"{db.pattern_errors[i, k]:>10.4f}" if np.isfinite(db.pattern_errors[i, k]) else f"{'-':>10}"
                        for k in range(len(db.patterns)))
        print(f"{name:<{width}} {shape:>14} {_size(sizes[name]):>10}{errs}")
    if args.levels:
        print()
        print(f"{'level':>5} {'sparsity':>9} {'mean err':>9} {'max err':>9}  encodings")
        built = [i for i, n in enumerate(db.layers) if n in sizes]
        for j, s in enumerate(grid):
            col = db.errors[built, j] if built else np.array([np.nan])
            encs: dict[str, int] = {}
            for i in built:
                e = db.encodings(i)[j]
                encs[e] = encs.get(e, 0) + 1
            enc_txt = ", ".join(f"{k} x{v}" for k, v in sorted(encs.items()))
            print(f"{j:>5} {s:>9.4f} {np.mean(col):>9.4f} {np.max(col):>9.4f}  {enc_txt}")
    return 0

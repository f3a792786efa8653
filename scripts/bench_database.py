"""Benchmark the reconstruction database on MiniLM (36 Linear layers x 42 levels, 128 sequences).

Measures, with torch (and the Numba sweep) at ``--threads`` threads:

* build time of a fresh database per method (obs, exact, magnitude), split into
  Hessian capture and per-layer reconstruction + encoding + write;
* disk size against dense fp32 x levels, and the encodings chosen;
* stitching all 36 layers (random levels, as the search does; cold = decoded from
  the memory-mapped files, warm = from the LRU cache) against one calibration-loss
  evaluation, alternated inside one process, medians over ``--repeats`` rounds;
* the mean relative reconstruction error per level for every method.

Prints tables; ``--json FILE`` writes everything with the hardware fingerprint,
``--markdown FILE`` writes the BENCHMARKS.md section.

    python scripts/bench_database.py --json scripts/results/bench_database.json \\
        --markdown scripts/results/database.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import summary, write_json  # noqa: E402

from spdy.database import Database, build_database  # noqa: E402
from spdy.grid import DEFAULT_GRID  # noqa: E402
from spdy.hardware import fingerprint  # noqa: E402
from spdy.models.base import load_model  # noqa: E402


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def bench_build(bundle, method: str, root: Path, keep: Path | None) -> tuple[Database, dict]:
    out = (keep / f"minilm-{method}") if keep else root / f"minilm-{method}"
    if out.exists():
        shutil.rmtree(out)
    load_before = _load()
    t0 = time.perf_counter()
    db = build_database(bundle, out, grid=DEFAULT_GRID, method=method, progress=False)
    total = time.perf_counter() - t0
    layer_s = sum(float(e.get("seconds", 0.0)) for e in db.manifest["layers"])
    encs: dict[str, int] = {}
    for i in range(len(db.layers)):
        for e in db.encodings(i):
            encs[e] = encs.get(e, 0) + 1
    rec = {
        "method": method,
        "damp": db.manifest["damp"],
        "build_s": total,
        "layers_s": layer_s,
        "capture_and_overhead_s": total - layer_s,
        "disk_bytes": db.total_bytes(),
        "dense_fp32_x_levels_bytes": db.dense_bytes(),
        "compression": db.dense_bytes() / db.total_bytes(),
        "encodings": encs,
        "mean_error_per_level": [float(x) for x in db.errors.mean(axis=0)],
        "median_error_per_level": [float(x) for x in np.median(db.errors, axis=0)],
        "load_avg_before": load_before,
        "load_avg_after": _load(),
    }
    return db, rec


def bench_stitch(bundle, db: Database, repeats: int, seed: int = 0) -> dict:
    """Cold stitch, warm stitch and one calibration loss, alternated ``repeats`` times."""
    dense_outputs = bundle.outputs()
    rng = np.random.default_rng(seed)
    S = len(db.grid)
    cold, warm, loss = [], [], []
    bundle.calibration_loss(bundle.model, dense_outputs)  # warm-up
    for _ in range(repeats):
        levels = {n: int(rng.integers(1, S)) for n in db.layers}
        db.clear_cache()
        t = time.perf_counter()
        db.stitch(bundle.model, levels)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        db.stitch(bundle.model, levels)
        warm.append(time.perf_counter() - t)
        t = time.perf_counter()
        bundle.calibration_loss(bundle.model, dense_outputs)
        loss.append(time.perf_counter() - t)
    db.stitch(bundle.model, {n: 0 for n in db.layers})  # back to dense
    sc, sw, sl = summary(cold), summary(warm), summary(loss)
    return {
        "layers_stitched": len(db.layers),
        "repeats": repeats,
        "stitch_cold_s": sc,
        "stitch_warm_s": sw,
        "calibration_loss_s": sl,
        "cold_over_loss": sc["median"] / sl["median"],
        "warm_over_loss": sw["median"] / sl["median"],
        # per-round ratios are robust to slow phases of the machine
        "cold_over_loss_per_round_median": float(np.median(np.array(cold) / np.array(loss))),
        "warm_over_loss_per_round_median": float(np.median(np.array(warm) / np.array(loss))),
    }


def markdown(payload: dict) -> str:
    fp = payload["fingerprint"]
    builds = payload["builds"]
    st = payload.get("stitch")
    lines = [
        "## Reconstruction database (MiniLM)",
        "",
        f"`python scripts/bench_database.py` on {fp['cpu_model']}, {fp['usable_cores']} cores, "
        f"torch {fp['versions'].get('torch')}, numpy {fp['versions'].get('numpy')}, "
        f"numba {fp['versions'].get('numba')}, {payload['threads']} threads. "
        f"all-MiniLM-L6-v2: 36 Linear layers x {len(payload['grid'])} levels, "
        f"{payload['n_calibration']} calibration sequences x {payload['seq_len']} tokens. "
        "Other engineers' jobs shared the 2 cores; load averages are in the JSON.",
        "",
        "| method | build (s) | capture + overhead (s) | layers (s) | disk | vs dense fp32 x levels |",
        "|---|---|---|---|---|---|",
    ]
    for b in builds:
        lines.append(
            f"| {b['method']} | {b['build_s']:.1f} | {b['capture_and_overhead_s']:.1f} | {b['layers_s']:.1f} | "
            f"{b['disk_bytes'] / 2**20:.1f} MiB | {b['compression']:.2f}x smaller ({b['dense_fp32_x_levels_bytes'] / 2**20:.0f} MiB) |"
        )
    if st:
        lines += [
            "",
            f"Stitching all {st['layers_stitched']} layers at random levels vs one `calibration_loss` "
            f"(median of {st['repeats']} alternated rounds):",
            "",
            "| | median (ms) | IQR / median | share of one loss evaluation |",
            "|---|---|---|---|",
            f"| calibration loss | {st['calibration_loss_s']['median'] * 1e3:.0f} | {st['calibration_loss_s']['iqr_rel']:.2f} | 100 % |",
            f"| stitch, cold (decode from mmap) | {st['stitch_cold_s']['median'] * 1e3:.1f} | {st['stitch_cold_s']['iqr_rel']:.2f} | {100 * st['cold_over_loss_per_round_median']:.1f} % |",
            f"| stitch, warm (LRU cache) | {st['stitch_warm_s']['median'] * 1e3:.1f} | {st['stitch_warm_s']['iqr_rel']:.2f} | {100 * st['warm_over_loss_per_round_median']:.2f} % |",
        ]
    grid = payload["grid"]
    methods = [b["method"] for b in builds]
    lines += [
        "",
        "Mean relative reconstruction error `||X W^T - X What^T||^2 / ||X W^T||^2` over the 36 layers, per level:",
        "",
        "| level | sparsity | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for j, s in enumerate(grid):
        cells = " | ".join(f"{b['mean_error_per_level'][j]:.4f}" for b in builds)
        lines.append(f"| {j} | {s:.4f} | {cells} |")
    enc = builds[0]["encodings"] if builds else {}
    lines += [
        "",
        "Notes:",
        "",
        "* Build = one fresh build per method (wall clock, including the pass over the calibration set "
        "that accumulates `H = sum x^T x` in float64 for all 36 layers; q/k/v share one product). "
        "`layers` is the sum of per-layer reconstruct + encode + atomic write. The target was <= 180 s for obs.",
        "* obs sweeps all 41 sparse levels of a layer at once: one Cholesky factor of the damped `H^-1` per "
        "layer, rows of all levels stacked, the in-block sweep in Numba, the updates between blocks as GEMMs; "
        "its errors come from the sweep's OBS loss increments (checked against `tr(D H D^T)` in the tests). "
        "magnitude spends its time on the explicit `tr(D H D^T)` error GEMMs. exact uses obs's masks and solves "
        "one Cholesky system per row and level in float64 (Numba, 4-row blocked), so exact <= obs by construction; obs <= magnitude held for every layer and level here (the slow test checks it).",
        f"* Disk: level 0 is stored dense (stitching level 0 restores the dense weight exactly), the other "
        f"levels pick the cheaper of bitmap and CSR (uint16 column indices) by the storage-cost formulas; "
        f"encodings over all layers x levels: {', '.join(f'{k} {v}' for k, v in sorted(enc.items()))} "
        "(CSR wins above 93.75 % sparsity). Values are float32, so the size is the same for every method.",
        "* Stitch copies the decoded weights into the existing Parameters. Cold = the LRU cache was cleared "
        "before the call, so every layer is decoded from the memory-mapped safetensors files (the files were "
        "in the OS page cache); warm = the same levels again, from the cache. The goal was <= 10 % of one "
        "calibration-loss evaluation.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--markdown", help="write the BENCHMARKS.md section here")
    ap.add_argument("--methods", default="obs,magnitude,exact", help="comma-separated methods to build")
    ap.add_argument("--threads", type=int, default=2, help="torch (and Numba) threads")
    ap.add_argument("--repeats", type=int, default=25, help="stitch / loss rounds")
    ap.add_argument("--keep", help="build the databases here (kept) instead of a temp folder")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bundle = load_model("minilm")
    keep = Path(args.keep) if args.keep else None
    builds, stitch = [], None
    with tempfile.TemporaryDirectory(prefix="spdy-bench-db-") as tmp:
        print(f"{'method':<10} {'build s':>8} {'capture s':>9} {'layers s':>9} {'disk MiB':>9} {'vs dense':>9}")
        for method in methods:
            db, rec = bench_build(bundle, method, Path(tmp), keep)
            builds.append(rec)
            print(f"{method:<10} {rec['build_s']:>8.1f} {rec['capture_and_overhead_s']:>9.1f} {rec['layers_s']:>9.1f} "
                  f"{rec['disk_bytes'] / 2**20:>9.1f} {rec['compression']:>8.2f}x   encodings {rec['encodings']}")
            if method == "obs":
                stitch = bench_stitch(bundle, db, args.repeats)
            db.close()
    if stitch:
        print(f"\nstitch {stitch['layers_stitched']} layers: cold {stitch['stitch_cold_s']['median'] * 1e3:.1f} ms, "
              f"warm {stitch['stitch_warm_s']['median'] * 1e3:.1f} ms; one calibration loss "
              f"{stitch['calibration_loss_s']['median'] * 1e3:.0f} ms -> cold {100 * stitch['cold_over_loss_per_round_median']:.1f} %, "
              f"warm {100 * stitch['warm_over_loss_per_round_median']:.2f} % of it")
    grid = DEFAULT_GRID.as_array()
    print(f"\n{'level':>5} {'sparsity':>9} " + " ".join(f"{m:>10}" for m in methods))
    for j, s in enumerate(grid):
        print(f"{j:>5} {s:>9.4f} " + " ".join(f"{b['mean_error_per_level'][j]:>10.4f}" for b in builds))
    payload = {
        "fingerprint": fingerprint(threads=args.threads),
        "threads": args.threads,
        "grid": DEFAULT_GRID.to_json(),
        "n_calibration": bundle.meta.get("n_calibration"),
        "seq_len": bundle.meta.get("seq_len"),
        "builds": builds,
        "stitch": stitch,
    }
    write_json(args.json, payload)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(payload))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()

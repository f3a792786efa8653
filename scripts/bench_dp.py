"""Benchmark the Numba DP against a straightforward vectorised numpy DP.

Paper-sized instances from SPDY's published ResNet-50 table (54 layers including
conv1 and fc, 42 levels) at 10,000 and 100,000 buckets, plus a synthetic
L=52 instance. Prints a table; ``--json FILE`` writes it with the fingerprint.

    python scripts/bench_dp.py --json bench_dp.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import summary, time_calls, write_json  # noqa: E402

from spdy import dp  # noqa: E402
from spdy.hardware import fingerprint  # noqa: E402
from spdy.profile import load_profile  # noqa: E402

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "spdy-timings" / "rn50_unstr.txt"


def instances(ref: Path) -> list[tuple[str, np.ndarray, float]]:
    """(name, times [L, S], layer budget in seconds) at a 2x target."""
    out = []
    if ref.exists():
        t = load_profile(ref).table
        out.append((f"rn50_unstr (L={len(t.layers)})", np.asarray(t.times), t.budget_for(2.0)))
    rng = np.random.default_rng(0)
    times = np.sort(rng.random((52, 42)), axis=1)[:, ::-1] * 1e-3
    out.append(("synthetic (L=52)", times, float(times[:, 0].sum()) / 2))
    return out


def cold_compile_seconds() -> float:
    """JIT compile time of the DP kernel in a fresh process with an empty Numba cache."""
    code = "import time; from spdy import dp; print(dp.warmup())"
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ref", default=str(REF), help="SPDY reference timings file")
    args = ap.parse_args()

    compile_s = cold_compile_seconds()
    dp.warmup()
    rng = np.random.default_rng(1)
    records = []
    print(f"JIT compile: {compile_s * 1e3:.0f} ms (reported apart, not in the timings)")
    print(f"{'instance':<24} {'buckets':>8} {'numba ms':>9} {'numpy ms':>9} {'ratio':>7} {'same opt':>8}")
    for name, times, budget in instances(Path(args.ref)):
        L, S = times.shape
        errors = dp.prior_errors(L, S, rng.random(L))
        for buckets in (10_000, 100_000):
            T = dp.to_buckets(times, budget, buckets)
            nb, npy = [], []
            # alternate the two inside one process so that machine noise hits both alike
            dp._dp_kernel(T, errors, buckets)
            dp.dp_numpy(T, errors, buckets)
            for _ in range(args.repeats):
                nb += time_calls(lambda: dp._dp_kernel(T, errors, buckets), 1, warmup=0)
                npy += time_calls(lambda: dp.dp_numpy(T, errors, buckets), 1, warmup=0)
            # the whole public call (validation, rounding, Pareto filter) too
            full = time_calls(lambda: dp.solve_budget(times, errors, budget, buckets), args.repeats)
            e1 = dp._dp_kernel(T, errors, buckets)[1]
            e2 = dp.dp_numpy(T, errors, buckets)[1]
            sn, sp, sf = summary(nb), summary(npy), summary(full)
            rec = {
                "instance": name, "layers": L, "levels": S, "buckets": buckets,
                "numba_ms": sn["median"] * 1e3, "numpy_ms": sp["median"] * 1e3,
                "solve_budget_ms": sf["median"] * 1e3,
                "numba_iqr_rel": sn["iqr_rel"], "numpy_iqr_rel": sp["iqr_rel"],
                "ratio": sp["median"] / sn["median"], "same_optimum": bool(abs(e1 - e2) <= 1e-9 * max(1, abs(e2))),
                "repeats": args.repeats,
            }
            records.append(rec)
            print(f"{name:<24} {buckets:>8} {rec['numba_ms']:>9.2f} {rec['numpy_ms']:>9.1f} "
                  f"{rec['ratio']:>6.1f}x {str(rec['same_optimum']):>8}   (solve_budget {rec['solve_budget_ms']:.2f} ms)")
    write_json(args.json, {"fingerprint": fingerprint(threads=1), "compile_s": compile_s, "records": records})


if __name__ == "__main__":
    main()

"""The non-prunable ops of a transformer layer: torch's against spdy's kernels, per call.

MiniLM's shapes by default (12 heads of 32, 128 tokens, a 1536-wide GELU), batch 1: torch's
SDPA (``scaled_dot_product_attention``, then the transposition to token-major that the
model needs next) against :func:`spdy.kernels.attention.attention`, and torch's exact GELU
against :func:`spdy.kernels.activation.gelu`. Each pair alternates call by call in one
process (``rounds`` x ``calls``); the table gives medians and the median of the per-round
ratios, and the outputs' largest difference.

    python scripts/bench_base_ops.py --threads 1 2 --json scripts/results/bench_base_ops.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spdy.kernels as K  # noqa: E402  (first: one OpenMP runtime for torch and Numba)

import torch  # noqa: E402
from _common import write_json  # noqa: E402

from spdy.hardware import fingerprint  # noqa: E402
from spdy.kernels.activation import gelu  # noqa: E402
from spdy.kernels.attention import attention  # noqa: E402


def pair_rounds(a: Callable[[], Any], b: Callable[[], Any], rounds: int, calls: int) -> tuple[list[float], list[float]]:
    """Per round, the median seconds per call of ``a`` and of ``b``, called alternately."""
    ta_r, tb_r = [], []
    for _ in range(3):
        a(), b()
    for _ in range(rounds):
        ta, tb = [], []
        for _ in range(calls):
            t0 = time.perf_counter()
            a()
            t1 = time.perf_counter()
            b()
            t2 = time.perf_counter()
            ta.append(t1 - t0)
            tb.append(t2 - t1)
        ta_r.append(statistics.median(ta))
        tb_r.append(statistics.median(tb))
    return ta_r, tb_r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=1536, help="width of the GELU's input")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    K.warmup()
    K.retain_freed_memory()
    g = torch.Generator().manual_seed(0)
    T, H, D = args.tokens, args.heads, args.head_dim
    q, k, v = (torch.randn(1, T, H * D, generator=g).view(1, T, H, D).transpose(1, 2) for _ in range(3))
    x = torch.randn(T, args.ffn, generator=g) * 2
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ops = {
        "attention": (lambda: sdpa(q, k, v).transpose(1, 2).contiguous(), lambda: attention(q, k, v)),
        "gelu": (lambda: torch.nn.functional.gelu(x), lambda: gelu(x)),
    }
    diffs = {"attention": float((ops["attention"][0]() - ops["attention"][1]()).abs().max()),
             "gelu": float((ops["gelu"][0]() - ops["gelu"][1]()).abs().max())}
    rows = []
    print(f"{'op':<10} {'threads':>7} {'torch us':>9} {'spdy us':>8} {'spdy/torch':>10}  (median of {args.rounds} "
          f"rounds of {args.calls} alternating calls; ratio: median of the per-round ratios)")
    for threads in args.threads:
        K.set_num_threads(threads)
        with torch.inference_mode():
            for name, (ref, ours) in ops.items():
                tr, ts = pair_rounds(ref, ours, args.rounds, args.calls)
                ratio = statistics.median(s / r for s, r in zip(ts, tr))
                row = {"op": name, "threads": threads, "torch_us": statistics.median(tr) * 1e6,
                       "spdy_us": statistics.median(ts) * 1e6, "ratio": ratio,
                       "ratios": [s / r for s, r in zip(ts, tr)], "max_abs_diff": diffs[name]}
                rows.append(row)
                print(f"{name:<10} {threads:>7} {row['torch_us']:>9.1f} {row['spdy_us']:>8.1f} {ratio:>10.3f}", flush=True)
    print("max |torch - spdy|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    write_json(args.json, {"schema": "spdy.bench_base_ops", "schema_version": 1,
                           "fingerprint": fingerprint(extra={"openmp": K.openmp_status()}),
                           "settings": vars(args), "records": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

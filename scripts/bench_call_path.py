"""What a sparse Linear costs per call beyond its kernel: the module's paths, side by side.

For each MiniLM Linear shape (128 tokens) at each ``--sparsity``, in rounds that alternate the
order, in one process:

* ``module``: ``SparseLinear(x)``, the call a model makes (``nn.Module.__call__`` included);
* ``fast``: ``SparseLinear._run``, the per-call path (an fp32, contiguous CPU input that needs
  no grad goes straight to the kernel);
* ``checked``: ``SparseLinear._run_checked``, the path for any input (checks, ``contiguous``,
  then the checked ``spdy.kernels.linear``);
* ``kernel``: ``spdy.kernels.linear.sparse_into`` on preallocated arrays, rows of tokens in and out
  (the floor of a layer called on its own: its input packed into token tiles, its output unpacked);
* ``tiles``: the layer on activations kept in the kernels' tile layout, as an encoder plan runs a
  layer whose parts all fuse (``spdy.kernels._spmm.linear_tiles``), nothing packed or unpacked.

Freed activation memory is kept in the process (:func:`spdy.kernels.retain_freed_memory`), as
``spdy.apply(..., sparse=True)`` and the profiler run; ``--no-retain`` leaves glibc's defaults, under
which every output of 128 KiB or more is a fresh ``mmap`` whose pages fault in on first touch.
Prints microseconds per call (median over rounds) and the per-round ratio fast / checked, and
writes them with the hardware fingerprint to ``--json``.

    python scripts/bench_call_path.py [--threads 1 2] [--sparsity 0.95 1.0] [--rounds 15] [--no-retain] [--json F]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import spdy.kernels as kernels  # noqa: F401  - before torch: one OpenMP runtime
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import linear_tiles_runner, write_json  # noqa: E402

from spdy.hardware import fingerprint
from spdy.kernels.linear import sparse_into
from spdy.runtime import SparseLinear

SHAPES = ((384, 384), (1536, 384), (384, 1536))  # (out, in): attention, FFN up, FFN down


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def paths(module: SparseLinear, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The four ways to run ``module`` on ``x`` (see the module docstring)."""
    p = module.prepared
    x2 = x.numpy().reshape(-1, p.in_features)
    y2 = np.empty((x2.shape[0], p.out_features), np.float32)
    return {"module": lambda: module(x), "fast": lambda: module._run(x), "checked": lambda: module._run_checked(x),
            "kernel": lambda: sparse_into(x2, y2, p), "tiles": linear_tiles_runner(p, x2)}


def measure(out_f: int, in_f: int, sparsity: float, tokens: int, rounds: int, calls: int,
            seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < sparsity] = 0
    module = SparseLinear.from_linear(lin, "csr", tokens=tokens)
    x = torch.randn(1, tokens, in_f)
    with torch.inference_mode():
        torch.testing.assert_close(module._run(x), module._run_checked(x))
        fns = paths(module, x)
        for fn in fns.values():
            per_call_us(fn, 20)
        got: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(rounds):
            for k in (list(fns) if r % 2 else list(reversed(fns))):
                got[k].append(per_call_us(fns[k], calls))
    ratio = np.array(got["fast"]) / np.array(got["checked"])
    return {**{f"{k}_us": float(np.median(v)) for k, v in got.items()},
            "fast_over_checked": float(np.median(ratio)), "fast_over_checked_p10_p90": np.percentile(ratio, [10, 90]).tolist()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.95, 1.0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--no-retain", action="store_true",
                    help="leave glibc's allocator as it is (the runtime keeps freed memory; see the docstring)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    retained = False if a.no_retain else kernels.retain_freed_memory()
    print(f"freed memory retained: {retained}")
    rows = []
    print("| threads | shape (out x in) | sparsity | module us | fast us | checked us | kernel us | on tiles us | fast / checked |")
    print("|---|---|---|---|---|---|---|---|---|")
    for th in a.threads:
        kernels.set_num_threads(th)
        for out_f, in_f in SHAPES:
            for s in a.sparsity:
                r = {"threads": th, "out": out_f, "in": in_f, "sparsity": s,
                     **measure(out_f, in_f, s, a.tokens, a.rounds, a.calls)}
                rows.append(r)
                print(f"| {th} | {out_f}x{in_f} | {s:.0%} | {r['module_us']:.1f} | {r['fast_us']:.1f} | "
                      f"{r['checked_us']:.1f} | {r['kernel_us']:.1f} | {r['tiles_us']:.1f} | {r['fast_over_checked']:.3f} |")
    write_json(a.json, {"fingerprint": fingerprint(), "settings": vars(a), "freed_memory_retained": retained,
                        "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A BERT feed-forward fused (spdy.kernels.ffn) against its four operators one by one, side by side.

For MiniLM's feed-forward shapes (384 -> 1536 -> 384, 128 tokens), both projections pruned to
each ``--sparsity`` (random weights, magnitude-pruned, ``csr``), in rounds that alternate the
order, in one process:

* ``fused``: :func:`spdy.kernels.ffn.ffn_into` with the residual (and with ``--layer-norm`` the
  LayerNorm after it), into a new tensor (what the encoder's forward runs);
* ``alone``: the up projection (``sparse_into``), spdy's GELU, the down projection and torch's
  residual add (and torch's ``layer_norm``), each on its own (what runs when fusion is off).

Prints microseconds per call (median over rounds) and the median per-round ratio fused / alone,
and writes them with the hardware fingerprint to ``--json``.

    python scripts/bench_ffn.py [--threads 1 2] [--sparsity 0.7 0.9 0.97 1.0] [--layer-norm] [--rounds 15] [--json F]
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
from _common import write_json  # noqa: E402

from spdy.hardware import fingerprint
from spdy.kernels.activation import gelu
from spdy.kernels.ffn import ffn_into
from spdy.kernels.linear import prepare_linear, sparse_into

HIDDEN, INNER = 384, 1536


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def measure(sparsity: float, tokens: int, rounds: int, calls: int, seed: int = 0,
            layer_norm: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def pruned(o: int, i: int) -> np.ndarray:
        w = (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
        if sparsity > 0:
            w[np.abs(w) <= np.quantile(np.abs(w), sparsity)] = 0
        return w

    up = prepare_linear(pruned(INNER, HIDDEN), rng.standard_normal(INNER).astype(np.float32), format="csr")
    down = prepare_linear(pruned(HIDDEN, INNER), rng.standard_normal(HIDDEN).astype(np.float32), format="csr")
    xt = torch.randn(tokens, HIDDEN)
    x = xt.numpy()
    gamma, beta = torch.randn(HIDDEN), torch.randn(HIDDEN)
    norm = (gamma.numpy(), beta.numpy(), 1e-12) if layer_norm else None

    def fused() -> torch.Tensor:
        y = torch.empty(tokens, HIDDEN)
        ffn_into(x, y.numpy(), up, down, True, norm)
        return y

    def alone() -> torch.Tensor:
        h = torch.empty(tokens, INNER)
        sparse_into(x, h.numpy(), up)
        g = gelu(h)
        z = torch.empty(tokens, HIDDEN)
        sparse_into(g.numpy(), z.numpy(), down)
        z = z + xt
        return torch.nn.functional.layer_norm(z, (HIDDEN,), gamma, beta, 1e-12) if layer_norm else z

    torch.testing.assert_close(fused(), alone(), atol=1e-4, rtol=1e-4)
    fns = {"fused": fused, "alone": alone}
    for fn in fns.values():
        per_call_us(fn, 20)
    got: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 else list(reversed(fns))):
            got[k].append(per_call_us(fns[k], calls))
    ratio = np.array(got["fused"]) / np.array(got["alone"])
    return {"fused_us": float(np.median(got["fused"])), "alone_us": float(np.median(got["alone"])),
            "fused_over_alone": float(np.median(ratio)), "fused_over_alone_p10_p90": np.percentile(ratio, [10, 90]).tolist()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.7, 0.9, 0.97, 1.0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--layer-norm", action="store_true", help="the LayerNorm after the residual in both paths")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    print("| threads | sparsity | fused us | alone us | fused / alone (p10-p90) | saved us |")
    print("|---|---|---|---|---|---|")
    for th in a.threads:
        kernels.set_num_threads(th)
        for s in a.sparsity:
            r = {"threads": th, "sparsity": s, "layer_norm": a.layer_norm,
                 **measure(s, a.tokens, a.rounds, a.calls, layer_norm=a.layer_norm)}
            rows.append(r)
            lo, hi = r["fused_over_alone_p10_p90"]
            print(f"| {th} | {s:.0%} | {r['fused_us']:.1f} | {r['alone_us']:.1f} | {r['fused_over_alone']:.3f} "
                  f"({lo:.3f}-{hi:.3f}) | {r['alone_us'] - r['fused_us']:.1f} |")
    write_json(a.json, {"fingerprint": fingerprint(), "settings": vars(a), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Depthwise convolutions of a CNN: torch's against spdy's fused kernel, per call and in the whole model.

For each batch size and thread count, the model in its inference form (BatchNorms folded)
is run once to find every depthwise convolution with the zero pad before it and the
activation after it (:func:`spdy.runtime.find_depthwise`). Per call: torch's chain (the
model's own pad, convolution and activation modules) against :class:`spdy.runtime.DepthwiseConv2d`
on the input the chain sees in the model, alternating call by call. Whole model: torch eager
against the same model with :func:`spdy.runtime.fast_depthwise`, alternating. Medians of
``rounds`` rounds; ratios are the median of the per-round ratios (spdy's time / torch's).

    python scripts/bench_depthwise.py --batch 1 8 --threads 1 2 --json scripts/results/bench_depthwise.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spdy.kernels as K  # noqa: E402  (first: one OpenMP runtime for torch and Numba)

import torch  # noqa: E402
from _common import write_json  # noqa: E402
from bench_base_ops import pair_rounds  # noqa: E402
from torch import nn  # noqa: E402

from spdy import runtime  # noqa: E402
from spdy.hardware import fingerprint  # noqa: E402
from spdy.models.base import load_model  # noqa: E402


def chains(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Every depthwise chain of ``model``: torch's modules, spdy's fused module and the chain's input."""
    fusions = runtime.find_depthwise(model, lambda m: m(x))
    mods = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    hooks = [mods[f.pad or f.conv].register_forward_pre_hook(lambda _m, a, n=f.conv: inputs.__setitem__(n, a[0]))
             for f in fusions]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    out = []
    for f in fusions:
        names = [n for n in (f.pad, f.conv, f.act) if n is not None]
        seq = nn.Sequential(*[mods[n] for n in names])
        fused, idx = copy.deepcopy(seq), {n: str(i) for i, n in enumerate(names)}
        runtime.fast_depthwise(fused, [runtime.DepthwiseFusion(idx[f.conv], idx.get(f.pad), idx.get(f.act))])
        out.append({"fusion": f, "torch": seq, "spdy": fused, "conv": mods[f.conv], "input": inputs[f.conv]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="spdy.examples.efficientnet_lite:factory")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10, help="alternating calls per round, per layer")
    ap.add_argument("--model-calls", type=int, default=3, help="alternating calls per round, whole model")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    K.warmup()
    K.retain_freed_memory()
    records: list[dict[str, Any]] = []
    for batch in args.batch:
        bundle = load_model(args.model, example_batch=batch).inference
        model, x = bundle.model.eval(), bundle.example
        fast = copy.deepcopy(model)
        runtime.fast_base(fast, run=lambda m: m(x))
        with torch.inference_mode():
            diff = float((fast(x) - model(x)).abs().max())
        layers = chains(model, x)
        for threads in args.threads:
            K.set_num_threads(threads)
            print(f"\nbatch {batch}, {threads} thread(s): {len(layers)} depthwise convolutions, whole-model max |diff| "
                  f"{diff:.1e}")
            print(f"{'layer':<32} {'input':<18} {'k/s':>5} {'torch ms':>9} {'spdy ms':>8} {'spdy/torch':>10}")
            tot_t = tot_s = 0.0
            with torch.inference_mode():
                for c in layers:
                    f, conv, xi = c["fusion"], c["conv"], c["input"]
                    tr, ts = pair_rounds(lambda: c["torch"](xi), lambda: c["spdy"](xi), args.rounds, args.calls)
                    rec = {"kind": "layer", "batch": batch, "threads": threads, "layer": f.conv,
                           "fused": [n for n in (f.pad, f.act) if n], "input_shape": list(xi.shape),
                           "kernel": conv.kernel_size[0], "stride": conv.stride[0],
                           "torch_ms": statistics.median(tr) * 1e3, "spdy_ms": statistics.median(ts) * 1e3,
                           "ratio": statistics.median(s / r for s, r in zip(ts, tr))}
                    records.append(rec)
                    tot_t, tot_s = tot_t + rec["torch_ms"], tot_s + rec["spdy_ms"]
                    print(f"{f.conv:<32} {str(tuple(xi.shape[1:])):<18} {conv.kernel_size[0]}/{conv.stride[0]:<3} "
                          f"{rec['torch_ms']:>9.3f} {rec['spdy_ms']:>8.3f} {rec['ratio']:>10.3f}", flush=True)
                print(f"{'sum of the medians':<57} {tot_t:>9.3f} {tot_s:>8.3f} {tot_s / tot_t:>10.3f}")
                tr, ts = pair_rounds(lambda: model(x), lambda: fast(x), args.rounds, args.model_calls)
            rec = {"kind": "model", "batch": batch, "threads": threads, "torch_ms": statistics.median(tr) * 1e3,
                   "spdy_ms": statistics.median(ts) * 1e3, "ratio": statistics.median(s / r for s, r in zip(ts, tr)),
                   "ratios": [s / r for s, r in zip(ts, tr)], "max_abs_diff": diff, "layers_sum_torch_ms": tot_t,
                   "layers_sum_spdy_ms": tot_s}
            records.append(rec)
            print(f"{'whole model (torch eager / with spdy depthwise)':<57} {rec['torch_ms']:>9.2f} "
                  f"{rec['spdy_ms']:>8.2f} {rec['ratio']:>10.3f}", flush=True)
    write_json(args.json, {"schema": "spdy.bench_depthwise", "schema_version": 1,
                           "fingerprint": fingerprint(extra={"openmp": K.openmp_status()}),
                           "settings": vars(args), "records": records})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

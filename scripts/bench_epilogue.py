"""The attention output projection with the residual and LayerNorm in its kernel's epilogue, on or off, inside MiniLM.

all-MiniLM-L6-v2 with every encoder Linear magnitude-pruned to ``S`` and run in ``csr`` (the
feed-forward fused in both arms), one document of 128 tokens; rounds alternate which arm runs
first, 30 calls each after 3 warm-up calls. Prints the median time of each arm, the median
per-round ratio on / off with its 10th and 90th percentiles, and the saving per layer.

    python scripts/bench_epilogue.py S THREADS ROUNDS      # e.g. 0.9 2 15
"""

import sys
import time

import spdy.kernels as kernels  # noqa: F401  - before torch: one OpenMP runtime
import numpy as np
import torch

from spdy import runtime
from spdy.models.minilm import lee_background_docs, load_encoder, tokenize

S, thr, rounds = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
kernels.set_num_threads(thr)
torch.set_num_threads(thr)
model, tok = load_encoder()
model.eval()
with torch.no_grad():
    for n, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and "encoder.layer" in n:
            w = m.weight
            w[w.abs() <= w.abs().flatten().kthvalue(int(S * w.numel())).values] = 0
runtime.fast_base(model)
runtime.swap_modules(model, {n: runtime.SparseLinear.from_linear(m, "csr") for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and "encoder.layer" in n})
batch = tokenize(tok, lee_background_docs()[:1], 128)


def run() -> None:
    with torch.inference_mode():
        model(**batch)


for _ in range(20):
    run()
ratios, on, off = [], [], []
for r in range(rounds):
    res = {}
    for mode in ((True, False) if r % 2 else (False, True)):
        runtime.set_epilogue_fusion(model, mode)
        for _ in range(3):
            run()
        t = time.perf_counter()
        for _ in range(30):
            run()
        res[mode] = (time.perf_counter() - t) / 30
    ratios.append(res[True] / res[False])
    on.append(res[True])
    off.append(res[False])
print(f"S={S} threads={thr}: epilogue on {np.median(on) * 1e3:.3f} ms, off {np.median(off) * 1e3:.3f} ms, ratio "
      f"{np.median(ratios):.4f} (p10 {np.percentile(ratios, 10):.4f} p90 {np.percentile(ratios, 90):.4f}), "
      f"saving {(np.median(off) - np.median(on)) * 1e6 / 6:.1f} us/layer")

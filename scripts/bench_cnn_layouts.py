"""The dense CNN in torch, four ways, side by side: which is the fastest dense way to run it here?

``--model`` (default EfficientNet-Lite0) in its inference form (BatchNorms folded), timed
dense and interleaved round by round, in one process:

* ``eager``: torch eager, NCHW (what spdy's ``torch`` reference runs);
* ``eager_channels_last``: torch eager with the model and input in ``channels_last``;
* ``compiled``: ``torch.compile`` (Inductor, static shapes; spdy's ``torch_compile`` reference);
* ``compiled_no_layout``: the same with Inductor's layout optimisation off (no conversion to
  channels-last inside the graph).

ONNX Runtime dense (graph optimisations on) is timed in a block of its own each round. Prints
each one's median time and its median per-round ratio to eager; ``--json FILE`` writes them
with the hardware fingerprint.

    python scripts/bench_cnn_layouts.py [--model M] [--threads 2] [--rounds 6] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spdy import runtime  # noqa: E402 - the kernels before torch: one OpenMP runtime

import torch  # noqa: E402

from _common import write_json  # noqa: E402
from spdy.hardware import fingerprint  # noqa: E402
from spdy.profilers.ort_cpu import OrtCpuBackend  # noqa: E402
from spdy.stages import as_bundle  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="spdy.examples.efficientnet_lite:factory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=4, help="calls per runner per round")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runtime.set_num_threads(args.threads)
    runtime.kernels.retain_freed_memory()
    bundle = as_bundle(args.model).inference
    model, ex, fwd = bundle.model.eval(), bundle.example, bundle.forward
    if not isinstance(ex, torch.Tensor) or ex.dim() != 4:
        ap.error(f"--model must take one NCHW image batch; its example is {type(ex).__name__}")
    import torch._inductor.config as inductor_config

    with torch.inference_mode():
        compiled = torch.compile(copy.deepcopy(model), dynamic=False)
        fwd(compiled, ex)
        torch._dynamo.reset()
        inductor_config.layout_optimization = False
        no_layout = torch.compile(copy.deepcopy(model), dynamic=False)
        fwd(no_layout, ex)
        inductor_config.layout_optimization = True
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        ex_cl = ex.contiguous(memory_format=torch.channels_last)
        want = fwd(model, ex)
        for m, x in ((cl, ex_cl), (compiled, ex), (no_layout, ex)):
            got = fwd(m, x)
            assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())), "a form computes another model"
    runs = {"eager": lambda: fwd(model, ex), "eager_channels_last": lambda: fwd(cl, ex_cl),
            "compiled": lambda: fwd(compiled, ex), "compiled_no_layout": lambda: fwd(no_layout, ex)}
    ort = OrtCpuBackend(threads=args.threads, shared_pool=False).dense_runner(bundle)
    got: dict[str, list[float]] = {k: [] for k in [*runs, "onnxruntime"]}
    with torch.inference_mode():
        for r in [*runs.values(), ort]:
            r()
        for i in range(args.rounds):
            for k, r in runs.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    r()
                got[k].append((time.perf_counter() - t0) / args.calls)
            time.sleep(0.05)  # torch's idle workers stop spinning before ONNX Runtime's pool runs
            t0 = time.perf_counter()
            for _ in range(args.calls):
                ort()
            got["onnxruntime"].append((time.perf_counter() - t0) / args.calls)
            time.sleep(0.05)
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in got.items()),
                  flush=True)
    rows = {k: {"median_ms": statistics.median(v) * 1e3,
                "over_eager": statistics.median([a / b for a, b in zip(v, got["eager"])])} for k, v in got.items()}
    print(f"\n{bundle.name}, {args.threads} thread(s), median of {args.rounds} rounds")
    print(f"{'form':<22} {'ms':>8} {'time / eager':>13}")
    for k, r in rows.items():
        print(f"{k:<22} {r['median_ms']:>8.2f} {r['over_eager']:>13.3f}")
    write_json(str(args.json) if args.json else None, {
        "fingerprint": fingerprint(args.threads), "model": bundle.name, "threads": args.threads,
        "rounds": args.rounds, "calls": args.calls, "rows": rows, "samples_s": got})


if __name__ == "__main__":
    main()

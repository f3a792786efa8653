"""Sparse 1x1 convolutions against torch's dense ones, shape by shape, side by side.

Every ungrouped 1x1 convolution shape of ``--model`` (default EfficientNet-Lite0, found with
one traced forward pass at ``--batch`` images) with random N(0, 1/C) weights, each level
magnitude-pruned; per shape, interleaved in rounds in one process:

* ``dense``: torch's conv2d on NCHW (oneDNN);
* ``dense_cl``: the same with input and weight in ``channels_last``;
* ``dense_ort``: ONNX Runtime running the dense convolution alone (graph optimisations on,
  the input and output bound once; ``--no-ort`` leaves it out). Its fixed cost per ``Run``
  (an Identity graph's time) is reported too: inside a whole exported model it is paid once;
* ``implicit@s``: spdy's implicit-GEMM conv kernel (the path of 3x3 convolutions: images, or
  pixel tiles of one image, split between threads; until the commit after 9006748 it took one
  image at a time and split the output rows);
* ``pixels@s``: what ``spdy.kernels.conv2d`` runs for a sparse 1x1 conv: a Linear over the
  pixels, tiles of 64 pixels (across images) split between threads.

Prints microseconds per call (median over rounds) and, per shape, the lowest level at which
the pixel-tile kernel takes less time than the fastest of the dense columns ("pays from";
``-`` for none of the levels), and writes them with the hardware fingerprint to ``--json``.

    python scripts/bench_pointwise.py --threads 2 --batch 8 --levels 0.7 0.9 0.95 --json F
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spdy import runtime  # noqa: E402 - the kernels before torch: one OpenMP runtime

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import write_json  # noqa: E402
from spdy.hardware import fingerprint  # noqa: E402
from spdy.kernels.conv import conv2d, implicit_into, prepare_conv2d  # noqa: E402
from spdy.profilers.base import DENSE, LayerChoice  # noqa: E402
from spdy.stages import as_bundle  # noqa: E402
from spdy.types import LayerSpec  # noqa: E402


def pointwise_shapes(model_ref: str, batch: int) -> list[tuple[int, int, int, int]]:
    """(C, O, H, W) of every ungrouped 1x1 convolution of the model, in order of first use."""
    bundle = as_bundle(model_ref).inference
    found: dict[tuple[int, int, int, int], None] = {}

    def hook(m: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        found.setdefault((m.in_channels, m.out_channels, inp[0].shape[-2], inp[0].shape[-1]), None)

    hooks = [m.register_forward_hook(hook) for m in bundle.model.modules()
             if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.kernel_size == (1, 1) and m.stride == (1, 1)]
    ex = bundle.example
    with torch.inference_mode():
        bundle.forward(bundle.model.eval(), ex[:1])
    for h in hooks:
        h.remove()
    return list(found)


def implicit(x: np.ndarray, p, y: np.ndarray) -> None:
    """The implicit-GEMM conv kernel on a 1x1 weight (what conv2d ran for it before the pixel tiles)."""
    implicit_into(np.ascontiguousarray(x, dtype=np.float32), p, y, numba.get_num_threads())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="spdy.examples.efficientnet_lite:factory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.7, 0.9, 0.95])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-ort", dest="ort", action="store_false", help="leave ONNX Runtime out")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    runtime.set_num_threads(args.threads)
    runtime.kernels.retain_freed_memory()
    shapes = pointwise_shapes(args.model, args.batch)
    rng = np.random.default_rng(0)
    ort = None
    if args.ort:
        from spdy.profilers.ort_cpu import OrtCpuBackend

        ort = OrtCpuBackend(threads=args.threads, shared_pool=False)
        print(f"ONNX Runtime's fixed cost per Run: {ort.run_overhead_s() * 1e6:.1f} us")
    dense_cols = ["dense", "dense_cl"] + (["dense_ort"] if ort else [])
    cols = dense_cols + [f"{k}@{s:g}" for s in args.levels for k in ("implicit", "pixels")]
    print(f"{args.model}: {len(shapes)} 1x1 shapes, batch {args.batch}, {args.threads} thread(s); us per call")
    print(f"{'C->O @HxW':>18} " + " ".join(f"{c:>12}" for c in cols) + f" {'pays from':>9}")
    rows = []
    for C, O, H, W in shapes:
        x = torch.from_numpy(rng.standard_normal((args.batch, C, H, W)).astype(np.float32))
        w = torch.from_numpy((rng.standard_normal((O, C, 1, 1)) / C**0.5).astype(np.float32))
        b = torch.from_numpy(rng.standard_normal(O).astype(np.float32))
        x_cl, w_cl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
        xn = x.numpy()
        runs = {"dense": lambda: torch.nn.functional.conv2d(x, w, b),
                "dense_cl": lambda: torch.nn.functional.conv2d(x_cl, w_cl, b)}
        if ort is not None:
            spec = LayerSpec(f"{C}->{O}", "conv2d", (O, C, 1, 1), tuple(x.shape))
            runs["dense_ort"] = ort.layer_runner(spec, LayerChoice(DENSE, weight=w.numpy(), bias=b.numpy()), xn)
            assert np.allclose(runs["dense_ort"](), runs["dense"]().numpy(), atol=1e-3), "ONNX Runtime computes another conv"
        for s in args.levels:
            wn = w.numpy().copy()
            wn[np.abs(wn) <= np.quantile(np.abs(wn), s)] = 0
            p = prepare_conv2d(wn, b.numpy(), format="csr")
            want = torch.nn.functional.conv2d(x, torch.from_numpy(wn), b).numpy()
            y1, y2 = np.empty_like(want), np.empty_like(want)
            implicit(xn, p, y1)
            conv2d(xn, p, out=y2)
            for y in (y1, y2):
                assert np.allclose(y, want, atol=1e-4 * max(1.0, float(np.abs(want).max()))), "a kernel computes another conv"
            runs[f"implicit@{s:g}"] = lambda p=p, y1=y1: implicit(xn, p, y1)
            runs[f"pixels@{s:g}"] = lambda p=p, y2=y2: conv2d(xn, p, out=y2)
        calls = max(3, int(20000 / (args.batch * H * W * C * O / 1e6 + 50)))
        got: dict[str, list[float]] = {k: [] for k in runs}
        with torch.inference_mode():
            for f in runs.values():
                f()
            for _ in range(args.rounds):
                for k, f in runs.items():
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        f()
                    got[k].append((time.perf_counter() - t0) / calls * 1e6)
        med = {k: statistics.median(v) for k, v in got.items()}
        pays = pays_from(med, dense_cols, args.levels)
        rows.append({"shape": [C, O, H, W], "us": med, "pays_from": pays})
        print(f"{C:>6}->{O:<5} @{H}x{W:<4} " + " ".join(f"{med[c]:12.0f}" for c in cols)
              + f" {'-' if pays is None else f'{pays:g}':>9}", flush=True)
    total = {c: sum(r["us"][c] for r in rows) for c in cols}
    pays = pays_from(total, dense_cols, args.levels)
    print(f"{'all shapes':>18} " + " ".join(f"{total[c]:12.0f}" for c in cols) + f" {'-' if pays is None else f'{pays:g}':>9}")
    write_json(args.json, {"model": args.model, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
                           "levels": args.levels, "rows": rows, "total_us": total, "pays_from": pays,
                           "ort_run_overhead_us": None if ort is None else ort.run_overhead_s() * 1e6,
                           "fingerprint": fingerprint()})


def pays_from(us: dict[str, float], dense_cols: list[str], levels: list[float]) -> float | None:
    """The lowest level at which the pixel-tile kernel takes less time than the fastest dense column."""
    fastest = min(us[c] for c in dense_cols)
    return next((s for s in sorted(levels) if us[f"pixels@{s:g}"] < fastest), None)


if __name__ == "__main__":
    main()

"""Benchmark spdy's sparse CPU kernels against dense and sparse baselines.

Shapes: MiniLM's Linear shapes (384x384, 1536x384, 384x1536; out x in) at 128
and 512 tokens, and three ResNet-50 Conv2d shapes (batch 1). Levels: 0.4 ...
0.98. Methods: ``torch-dense`` (F.linear / F.conv2d), ``ort-dense`` (ONNX
Runtime MatMul / Conv), ``ort-sparse`` (``com.microsoft.SparseToDenseMatMul``,
COO weight as a run-time input; Linear only), ``torch-csr`` (``to_sparse_csr``
weight times the transposed input; convs via ``F.unfold``), ``spdy``
(:mod:`spdy.kernels`, format ``auto``; rows of tokens in and out, as a layer called alone),
``spdy-tiles`` (the same weight where ``auto`` picks a sparse format, as an encoder's planned layer
runs it: ``spdy.kernels._spmm.linear_tiles`` on activations kept in the kernels' tile layout,
nothing packed or unpacked; Linear only). 1 and 2 threads.

Timing discipline: for every (shape, tokens, sparsity, threads) all methods run
on the same pruned weight, alternating in rounds inside one process; each
round is a block of calls of one method after a pause that lets the previous
method's idle workers stop spinning; medians over >= 25 calls. The baselines
get their preferred layouts for free (``x^T`` precomputed for ort-sparse and
torch-csr); spdy's time includes its own relayout of x and y. ``background``
in the JSON is the share of CPU time other processes used while this one
paused (0 = quiet machine).

    python scripts/bench_kernels.py --json scripts/results/kernels.json
    python scripts/bench_kernels.py --quick
    python scripts/bench_kernels.py --blocked --ort-custom-op --json out.json

``--blocked`` adds a blocked-4 vs unstructured comparison (same sparsity), and
``--ort-custom-op`` measures running spdy's kernel inside ONNX Runtime through
an onnxruntime-extensions Python custom op; both go to separate JSON keys.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spdy.kernels as K  # noqa: E402  (first: torch and Numba share one OpenMP runtime)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from _common import linear_tiles_runner, summary, write_json  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from spdy.hardware import fingerprint  # noqa: E402

LINEAR_SHAPES = [(384, 384), (1536, 384), (384, 1536)]
# ResNet-50: layer1 3x3 (stride 1), layer3 1x1 reduce (1024->256), layer2 first 3x3 (stride 2)
CONV_SHAPES = [
    dict(c=64, o=64, hw=56, k=3, s=1, p=1),
    dict(c=1024, o=256, hw=14, k=1, s=1, p=0),
    dict(c=128, o=128, hw=56, k=3, s=2, p=1),
]
LEVELS = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]
QUICK_LEVELS = [0.7, 0.8, 0.9, 0.95]
METHODS = ["torch-dense", "ort-dense", "ort-sparse", "torch-csr", "spdy", "spdy-tiles"]
PAUSE_S = 0.015  # > the idle spin of GOMP / ORT workers after a parallel region


class Background:
    """Share of CPU time used by other processes while this one sleeps (from /proc/stat)."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                v = [int(t) for t in f.readline().split()[1:]]
        except OSError:
            return None
        return sum(v), v[3] + v[4]

    def pause(self, seconds: float) -> None:
        a = self._read()
        time.sleep(seconds)
        b = self._read()
        if a and b and b[0] > a[0]:
            self.samples.append(1.0 - (b[1] - a[1]) / (b[0] - a[0]))

    def median(self, since: int = 0) -> float:
        """Median busy share of the samples taken after index ``since``."""
        x = self.samples[since:]
        return float(np.median(x)) if x else float("nan")

    def wait_quiet(self, max_s: float, threshold: float = 0.25, probe_s: float = 0.05) -> float:
        """Wait (at most ``max_s``) until other processes use < ``threshold`` of the CPU; returns the last reading."""
        deadline = time.perf_counter() + max_s
        while True:
            self.pause(probe_s)
            busy = self.samples[-1] if self.samples else 0.0
            if busy < threshold or time.perf_counter() >= deadline:
                return busy


def alternate(fns: dict[str, Callable[[], Any]], bg: Background, rounds: int, per_round: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each fn, rounds x per_round calls, methods alternating per round."""
    for f in fns.values():
        bg.pause(PAUSE_S)
        for _ in range(warmup):
            f()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            bg.pause(PAUSE_S)
            f()
            for _ in range(per_round):
                t0 = time.perf_counter()
                f()
                out[name].append(time.perf_counter() - t0)
    return out


def _session(model: Any, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _opsets(*extra: tuple[str, int]) -> list[Any]:
    return [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, v) for d, v in extra]


def linear_methods(W: np.ndarray, x: np.ndarray, threads: int, skip: set[str]) -> tuple[dict[str, Callable[[], Any]], str]:
    """Callables computing x W^T (no bias) per method, and spdy's chosen format."""
    O, I = W.shape
    T = x.shape[0]
    fns: dict[str, Callable[[], Any]] = {}
    xt, Wt = torch.from_numpy(x), torch.from_numpy(W)
    fns["torch-dense"] = lambda: torch.nn.functional.linear(xt, Wt)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wt"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, I])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, O])],
        [numpy_helper.from_array(np.ascontiguousarray(W.T), "Wt")],
    )
    sd = _session(helper.make_model(g, opset_imports=_opsets()), threads)
    fns["ort-dense"] = lambda: sd.run(None, {"x": x})
    xT = np.ascontiguousarray(x.T)
    if "ort-sparse" not in skip:
        g = helper.make_graph(
            [helper.make_node("SparseToDenseMatMul", ["A", "B"], ["Y"], domain="com.microsoft")], "sparse",
            [helper.make_sparse_tensor_value_info("A", TensorProto.FLOAT, [O, I]), helper.make_tensor_value_info("B", TensorProto.FLOAT, [I, T])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [O, T])],
        )
        ss = _session(helper.make_model(g, opset_imports=_opsets(("com.microsoft", 1))), threads)
        r, c = np.nonzero(W)
        st = ort.SparseTensor.sparse_coo_from_numpy(
            np.array([O, I], np.int64), np.ascontiguousarray(W[r, c]), np.stack([r, c], 1).astype(np.int64), ort.OrtDevice.make("cpu", 0)
        )
        feeds = {"A": ort.OrtValue.ort_value_from_sparse_tensor(st), "B": ort.OrtValue.ortvalue_from_numpy(xT)}
        fns["ort-sparse"] = lambda: ss.run_with_ort_values(["Y"], feeds)
    Wcsr = Wt.to_sparse_csr()
    xTt = torch.from_numpy(xT)
    fns["torch-csr"] = lambda: torch.mm(Wcsr, xTt)
    p = K.prepare_linear(W, format="auto", tokens=T)
    y = np.empty((T, O), np.float32)
    fns["spdy"] = lambda: K.linear(x, p, out=y)
    # correctness guard: every method computes the same product
    ref = x @ W.T
    np.testing.assert_allclose(K.linear(x, p), ref, atol=1e-3 * max(1, np.abs(ref).max()))
    if p.sparse is not None:
        fns["spdy-tiles"] = linear_tiles_runner(p, x, threads)
        fns["spdy-tiles"]()
        np.testing.assert_allclose(fns["spdy-tiles"].output(), ref, atol=1e-3 * max(1, np.abs(ref).max()))
    return {k: fns[k] for k in METHODS if k in fns}, p.format


def conv_methods(Wc: np.ndarray, x: np.ndarray, s: int, pad: int, threads: int) -> tuple[dict[str, Callable[[], Any]], str]:
    O, C, k, _ = Wc.shape
    fns: dict[str, Callable[[], Any]] = {}
    xt, wt = torch.from_numpy(x), torch.from_numpy(Wc)
    fns["torch-dense"] = lambda: torch.nn.functional.conv2d(xt, wt, None, s, pad)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], strides=[s, s], pads=[pad] * 4, kernel_shape=[k, k])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(Wc, "w")],
    )
    sd = _session(helper.make_model(g, opset_imports=_opsets()), threads)
    fns["ort-dense"] = lambda: sd.run(None, {"x": x})
    Wcsr = wt.reshape(O, -1).to_sparse_csr()
    Ho = (x.shape[2] + 2 * pad - k) // s + 1

    def torch_csr() -> torch.Tensor:
        cols = torch.nn.functional.unfold(xt, k, padding=pad, stride=s)[0]  # [C*k*k, L]
        return torch.mm(Wcsr, cols).view(1, O, Ho, -1)

    fns["torch-csr"] = torch_csr
    p = K.prepare_conv2d(Wc, None, stride=s, padding=pad, format="auto")
    y = np.empty((1, O, Ho, Ho), np.float32)
    fns["spdy"] = lambda: K.conv2d(x, p, out=y)
    ref = torch.nn.functional.conv2d(xt, wt, None, s, pad).numpy()
    np.testing.assert_allclose(K.conv2d(x, p), ref, atol=1e-3 * max(1, np.abs(ref).max()))
    np.testing.assert_allclose(torch_csr().numpy(), ref, atol=1e-3 * max(1, np.abs(ref).max()))
    return fns, p.format


def set_threads(n: int) -> None:
    K.set_num_threads(n)  # torch and Numba


def record(rows: list[dict[str, Any]], times: dict[str, list[float]], **key: Any) -> dict[str, float]:
    """Append one record per method (median, min, spread, n, plus ``key``); return the medians in ms."""
    med = {}
    for method, samples in times.items():
        st = summary(samples)
        med[method] = st["median"] * 1e3
        rows.append({**key, "method": method, "median_ms": st["median"] * 1e3, "min_ms": st["min"] * 1e3,
                     "iqr_rel": st["iqr_rel"], "n": st["n"]})
    return med


def fmt_row(label: str, med: dict[str, float], fmt: str, busy: float) -> str:
    best = min(med[m] for m in ("torch-dense", "ort-dense") if m in med)
    cells = " ".join(f"{med[m]:9.3f}" if m in med else f"{'-':>9}" for m in METHODS)
    return f"{label:>26} {cells}  {best / med['spdy']:6.2f}x  {fmt:5s} bg {busy:4.0%}"


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    bg = Background()
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    levels = QUICK_LEVELS if args.quick else LEVELS
    tokens_list = [128] if args.quick else [128, 512]
    header = f"{'shape / tokens / s':>26} " + " ".join(f"{m:>9}" for m in METHODS) + "  spdy vs best dense, format, background"
    for threads in args.threads:
        set_threads(threads)
        print(f"\n== {threads} thread(s), median ms ==\n{header}")
        for O, I in LINEAR_SHAPES:
            W0 = rng.standard_normal((O, I)).astype(np.float32)
            for T in tokens_list:
                x = rng.standard_normal((T, I)).astype(np.float32)
                for s in levels:
                    W = W0 * (rng.random((O, I)) >= s).astype(np.float32)
                    fns, fmt = linear_methods(W, x, threads, set())
                    bg.wait_quiet(args.max_wait)
                    n0 = len(bg.samples)
                    times = alternate(fns, bg, args.rounds, args.per_round)
                    key = dict(kind="linear", shape=f"{O}x{I}", tokens=T, sparsity=s, threads=threads)
                    med = record(rows, times, **key, format=fmt, background=bg.median(n0))
                    print(fmt_row(f"{O}x{I} T={T} s={s}", med, fmt, bg.median(n0)), flush=True)
        if args.quick:
            continue
        for cs in CONV_SHAPES:
            c, o, hw, k, st, pad = cs["c"], cs["o"], cs["hw"], cs["k"], cs["s"], cs["p"]
            W0 = rng.standard_normal((o, c, k, k)).astype(np.float32)
            x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
            ho = (hw + 2 * pad - k) // st + 1
            desc = f"conv {o}x{c}x{k}x{k} s{st} p{pad} @{hw}x{hw}"
            for s in levels:
                Wc = W0 * (rng.random(W0.shape) >= s).astype(np.float32)
                fns, fmt = conv_methods(Wc, x, st, pad, threads)
                bg.wait_quiet(args.max_wait)
                n0 = len(bg.samples)
                times = alternate(fns, bg, args.rounds, args.per_round)
                key = dict(kind="conv2d", shape=desc, tokens=ho * ho, sparsity=s, threads=threads)
                med = record(rows, times, **key, format=fmt, background=bg.median(n0))
                print(fmt_row(f"{o}x{c}x{k}x{k}s{st}@{hw} s={s}", med, fmt, bg.median(n0)), flush=True)
    return {"records": rows, "background": bg.median()}


def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """Speedup of spdy over the fastest dense runtime per level (min/max over shapes), per threads."""
    out = []
    key = lambda r: (r["kind"], r["shape"], r["tokens"], r["sparsity"], r["threads"])  # noqa: E731
    by: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by.setdefault(key(r), {})[r["method"]] = r["median_ms"]
    for kind in ("linear", "conv2d"):
        for threads in sorted({k[4] for k in by}):
            line = []
            for s in sorted({k[3] for k in by}):
                sp = [min(m["torch-dense"], m["ort-dense"]) / m["spdy"] for k, m in by.items() if k[0] == kind and k[3] == s and k[4] == threads]
                if sp:
                    line.append(f"{s}: {min(sp):.2f}-{max(sp):.2f}x")
            if line:
                out.append(f"{kind}, {threads} thread(s), spdy vs fastest dense: " + ", ".join(line))
            tl = []
            for s in sorted({k[3] for k in by}):
                sp = [min(m["torch-dense"], m["ort-dense"]) / m["spdy-tiles"] for k, m in by.items()
                      if k[0] == kind and k[3] == s and k[4] == threads and "spdy-tiles" in m]
                if sp:
                    tl.append(f"{s}: {min(sp):.2f}-{max(sp):.2f}x")
            if tl:
                out.append(f"{kind}, {threads} thread(s), spdy on tiles vs fastest dense: " + ", ".join(tl))
    # scaling 1 -> 2 threads of spdy
    t1 = {k[:4]: m["spdy"] for k, m in by.items() if k[4] == 1}
    t2 = {k[:4]: m["spdy"] for k, m in by.items() if k[4] == 2}
    common = sorted(set(t1) & set(t2))
    if common:
        ratios = [t1[k] / t2[k] for k in common]
        out.append(f"spdy 2 threads vs 1: median {np.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x) over {len(common)} cases")
    return out


def blocked_study(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Blocked patterns against unstructured at the same sparsity, 128 tokens.

    Per level: ``csr`` on an unstructured mask; ``bcsr1x4`` on a mask of
    aligned groups of 4 consecutive inputs (the SPDY paper engine's blocks);
    ``bcsr4x1`` on a mask of aligned groups of 4 consecutive output rows; ORT
    dense on the unstructured weight as the reference.
    """
    bg = Background()
    rng = np.random.default_rng(1)
    rows: list[dict[str, Any]] = []
    print("\n== blocked vs unstructured at the same sparsity, 128 tokens, median ms ==")
    print(f"{'shape / s / threads':>24} {'csr':>9} {'bcsr1x4':>9} {'bcsr4x1':>9} {'ort-dense':>9}  1x4 vs csr  4x1 vs csr")
    for threads in args.threads:
        set_threads(threads)
        for O, I in LINEAR_SHAPES:
            W0 = rng.standard_normal((O, I)).astype(np.float32)
            x = rng.standard_normal((128, I)).astype(np.float32)
            for s in QUICK_LEVELS:
                Wu = W0 * (rng.random((O, I)) >= s)
                W14 = W0 * np.repeat(rng.random((O, I // 4)) >= s, 4, axis=1)
                W41 = W0 * np.repeat(rng.random((O // 4, I)) >= s, 4, axis=0)
                p = {"csr": K.prepare_linear(Wu, format="csr"), "bcsr1x4": K.prepare_linear(W14, format="bcsr1x4"),
                     "bcsr4x1": K.prepare_linear(W41, format="bcsr4x1")}
                assert K.choose_format(W14) == "bcsr1x4" and K.choose_format(W41) == "bcsr4x1"
                y = np.empty((128, O), np.float32)
                fns: dict[str, Callable[[], Any]] = {k: (lambda q=q: K.linear(x, q, out=y)) for k, q in p.items()}
                fns["ort-dense"] = linear_methods(Wu, x, threads, {"ort-sparse"})[0]["ort-dense"]
                bg.wait_quiet(args.max_wait)
                n0 = len(bg.samples)
                times = alternate(fns, bg, args.rounds, args.per_round)
                med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
                for k, v in med.items():
                    rows.append({"shape": f"{O}x{I}", "tokens": 128, "sparsity": s, "threads": threads, "method": k,
                                 "median_ms": v, "background": bg.median(n0)})
                print(f"{f'{O}x{I} s={s} t={threads}':>24} {med['csr']:9.3f} {med['bcsr1x4']:9.3f} {med['bcsr4x1']:9.3f} "
                      f"{med['ort-dense']:9.3f}  {med['csr'] / med['bcsr1x4']:9.2f}x {med['csr'] / med['bcsr4x1']:9.2f}x", flush=True)
    return rows


def ort_custom_op_study(args: argparse.Namespace) -> dict[str, Any]:
    """Per-call cost of running spdy's kernel inside ONNX Runtime as an onnxruntime-extensions Python op."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, PyOp, get_library_path, onnx_op
    except ImportError as exc:
        return {"available": False, "error": f"onnxruntime-extensions not installed: {exc}"}
    import onnxruntime_extensions

    registry: dict[str, K.PreparedLinear] = {}

    @onnx_op(op_type="SpdyLinear", inputs=[PyOp.dt_float], outputs=[PyOp.dt_float], attrs={"layer": PyCustomOpDef.dt_string})
    def spdy_linear(x: np.ndarray, **attrs: Any) -> np.ndarray:
        return K.linear(x, registry[attrs["layer"]])

    @onnx_op(op_type="SpdyIdentity", inputs=[PyOp.dt_float], outputs=[PyOp.dt_float])
    def spdy_identity(x: np.ndarray) -> np.ndarray:
        return x

    def session(op: str, T: int, I: int, custom: bool, **attrs: Any) -> ort.InferenceSession:
        node = helper.make_node(op, ["x"], ["y"], domain="ai.onnx.contrib" if custom else "", **attrs)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, I])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        if custom:
            so.register_custom_ops_library(get_library_path())
        opsets = _opsets(("ai.onnx.contrib", 1)) if custom else _opsets()
        return ort.InferenceSession(helper.make_model(g, opset_imports=opsets).SerializeToString(), so, providers=["CPUExecutionProvider"])

    set_threads(1)
    bg = Background()
    rng = np.random.default_rng(2)
    O = I = 384
    W = (rng.standard_normal((O, I)) * (rng.random((O, I)) >= 0.9)).astype(np.float32)
    registry["l0"] = K.prepare_linear(W, format="csr")
    rows = []
    print("\n== spdy inside ONNX Runtime (onnxruntime-extensions Python op), 384x384 at 90%, 1 thread, median us ==")
    for T in (1, 16, 128, 512):
        x = rng.standard_normal((T, I)).astype(np.float32)
        s_lin, s_id, s_ort = session("SpdyLinear", T, I, True, layer="l0"), session("SpdyIdentity", T, I, True), session("Identity", T, I, False)
        np.testing.assert_allclose(s_lin.run(None, {"x": x})[0], x @ W.T, atol=1e-3)
        fns = {"spdy direct": lambda: K.linear(x, registry["l0"]), "ort + SpdyLinear": lambda: s_lin.run(None, {"x": x}),
               "ort + python identity op": lambda: s_id.run(None, {"x": x}), "ort Identity (native)": lambda: s_ort.run(None, {"x": x})}
        times = alternate(fns, bg, 5, 6)
        med = {k: float(np.median(v)) * 1e6 for k, v in times.items()}
        rows.append({"tokens": T, **{k: round(v, 1) for k, v in med.items()}})
        print(f"T={T:4d} " + "  ".join(f"{k}: {v:8.1f}" for k, v in med.items()), flush=True)
    return {"available": True, "version": onnxruntime_extensions.__version__, "unit": "us", "rows": rows}


def render_markdown(payload: dict[str, Any]) -> str:
    """Markdown tables (median ms per method, spdy's speedup over the fastest dense) from a results JSON."""
    by: dict[tuple, dict[str, Any]] = {}
    for r in payload["records"]:
        k = (r["kind"], r["shape"], r["tokens"], r["threads"], r["sparsity"])
        by.setdefault(k, {})[r["method"]] = r["median_ms"]
        by[k]["format"] = r.get("format", "")
    lines = []
    for kind in ("linear", "conv2d"):
        for threads in sorted({k[3] for k in by if k[0] == kind}):
            methods = [m for m in METHODS if any(m in v for k, v in by.items() if k[0] == kind)]
            lines.append(f"\n**{kind}, {threads} thread(s)** (median ms; last column: fastest dense / spdy)\n")
            lines.append("| shape | tokens | sparsity | " + " | ".join(methods) + " | spdy speedup |")
            lines.append("|---|---|---|" + "---|" * len(methods) + "---|")
            for k in sorted(k for k in by if k[0] == kind and k[3] == threads):
                m = by[k]
                best = min(m["torch-dense"], m["ort-dense"])
                cells = " | ".join(f"{m[x]:.3f}" if x in m else "-" for x in methods)
                lines.append(f"| {k[1]} | {k[2]} | {k[4]} | {cells} | **{best / m['spdy']:.2f}x** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="Linear shapes at 128 tokens, levels 0.7-0.95 only (< 3 min)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5, help="alternation rounds (default 5)")
    ap.add_argument("--per-round", type=int, default=6, help="timed calls per method per round (default 6)")
    ap.add_argument("--blocked", action="store_true", help="also compare blocked-4 with unstructured")
    ap.add_argument("--ort-custom-op", action="store_true", help="also measure spdy inside ORT via onnxruntime-extensions")
    ap.add_argument("--skip-main", action="store_true", help="only the extra studies")
    ap.add_argument("--max-wait", type=float, default=3.0,
                    help="before each group, wait up to this many seconds for other processes to go quiet "
                         "(default 3; at most 2 with --quick)")
    ap.add_argument("--render", metavar="JSON", help="print markdown tables from a results file and exit")
    args = ap.parse_args(argv)
    if args.render:
        import json

        payload = json.loads(Path(args.render).read_text())
        print(render_markdown(payload))
        for line in summarize(payload["records"]):
            print(f"- {line}")
        return 0
    if args.rounds * args.per_round < 25:
        ap.error("rounds x per-round must be >= 25 calls per method")
    if args.quick:
        args.max_wait = min(args.max_wait, 2.0)
    t0 = time.time()
    result: dict[str, Any] = {"records": [], "background": float("nan")}
    if not args.skip_main:
        result = run_benchmark(args)
    payload: dict[str, Any] = {
        "schema": "spdy.bench_kernels",
        "schema_version": 1,
        "fingerprint": fingerprint(extra={"openmp": K.openmp_status(), "numba_threading_layer": K.threading_layer()}),
        "settings": {"quick": args.quick, "threads": args.threads, "rounds": args.rounds, "per_round": args.per_round,
                     "warmup": 2, "pause_s": PAUSE_S, "max_wait_s": args.max_wait, "statistic": "median"},
        "background": result["background"],
        "records": result["records"],
    }
    if args.blocked:
        payload["blocked"] = blocked_study(args)
    if args.ort_custom_op:
        payload["ort_custom_op"] = ort_custom_op_study(args)
    payload["wall_s"] = time.time() - t0
    print()
    for line in summarize(payload["records"]):
        print(line)
    print(f"background CPU use by other processes: {payload['background']:.0%}; wall {payload['wall_s']:.0f} s")
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())

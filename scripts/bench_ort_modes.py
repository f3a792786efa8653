"""ONNX Runtime's dense MiniLM before and after torch eager ran in the same process, block by block.

The searches' rounds read ONNX Runtime's dense time at one of two speeds. This times the exported
model (``spdy.profilers.dense_runtimes``, the searches' runner: graph optimisations on, the
thread count of ``--threads``) in blocks of ``--calls`` calls: ``--blocks`` blocks alone; then
``--blocks`` blocks each after a block of torch eager's dense model and a ``--rest`` pause; then
``--blocks`` blocks alone again. It also reads every thread's CPU time over a one-second idle
pause at the end (a thread pool that spins shows there). Prints each block's median and writes
them with the hardware fingerprint to ``--json``.

    python scripts/bench_ort_modes.py --threads 2 --json scripts/results/bench_ort_modes.json
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from pathlib import Path

import spdy.profilers  # noqa: F401  - before torch: one OpenMP runtime for torch and Numba

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import block_ms, write_json  # noqa: E402

from spdy.hardware import fingerprint  # noqa: E402
from spdy.models.base import load_model  # noqa: E402
from spdy.profilers import get_backend  # noqa: E402
from spdy.profilers.dense_runtimes import ONNXRUNTIME, TORCH, dense_runtimes  # noqa: E402


def thread_ticks() -> dict[int, int]:
    """CPU clock ticks (user + system) each thread of this process has used (Linux)."""
    out = {}
    for task in glob.glob(f"/proc/{os.getpid()}/task/*"):
        try:
            fields = Path(task, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.rsplit("/", 1)[1])] = int(fields[11]) + int(fields[12])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=10, help="blocks per phase (default 10)")
    ap.add_argument("--calls", type=int, default=15, help="calls per block (default 15)")
    ap.add_argument("--rest", type=float, default=0.2, help="seconds between torch's block and ONNX Runtime's")
    ap.add_argument("--json", help="write the blocks here")
    args = ap.parse_args(argv)

    bundle = load_model("minilm")
    backend = get_backend("spdy-cpu", threads=args.threads)
    runtimes = dense_runtimes(backend, bundle.inference, state_probe=False)
    if ONNXRUNTIME not in runtimes.runtimes:
        raise SystemExit(f"ONNX Runtime is not available here: {runtimes.unavailable.get(ONNXRUNTIME)}")
    ort, eager = runtimes.runtimes[ONNXRUNTIME].runner, runtimes.runtimes[TORCH].runner
    ort()
    ort()
    phases: dict[str, list[float]] = {"alone": [], "after_torch": [], "alone_again": []}
    phases["alone"] = [block_ms(ort, args.calls) for _ in range(args.blocks)]
    for _ in range(args.blocks):
        block_ms(eager, args.calls)
        time.sleep(args.rest)
        phases["after_torch"].append(block_ms(ort, args.calls))
    phases["alone_again"] = [block_ms(ort, args.calls) for _ in range(args.blocks)]
    before = thread_ticks()
    time.sleep(1.0)
    after = thread_ticks()
    idle = {str(t): after[t] - before.get(t, 0) for t in after if after[t] - before.get(t, 0) > 0}
    for name, ms in phases.items():
        print(f"ONNX Runtime {name:12s}: " + " ".join(f"{x:.1f}" for x in ms) + f"  (median {statistics.median(ms):.1f} ms)")
    print(f"CPU ticks during a 1 s idle pause, threads that used any ({os.sysconf('SC_CLK_TCK')} a second): {idle}")
    write_json(args.json, {"fingerprint": fingerprint(), "settings": vars(args), "blocks_ms": phases,
                           "idle_ticks": idle})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

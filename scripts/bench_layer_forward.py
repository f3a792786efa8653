"""The encoder's per-layer forward of this tree against another revision's, side by side in one process.

For each search result given (``--result LABEL=OUT``, the ``-o`` folder of ``spdy search``), the
model is deployed as a user deploys it (``spdy.apply(..., sparse=True)``). The Python functions
that run a BERT layer in :class:`spdy.runtime.EncoderForward` (``_bert_layer`` and its helpers, and
``spdy.kernels.attention.unsupported``) are also loaded from ``--against`` (a git revision) and the
two versions run the same model in rounds that alternate which goes first (20 passes each after 3
warm-up passes). Prints, per model and thread count, the median per-round ratio this tree /
``--against`` with its quartiles; the outputs of both must agree to 1e-3 (a LayerNorm run in a
kernel's epilogue rounds unlike torch's). ``--json`` writes them with
the hardware fingerprint. ``--against qkv-off`` compares, in this tree, the query, key and value
projections run as one call with the same model running them one by one; ``--against out-off`` the
attention output projection with the residual and the LayerNorm in its epilogue with the same model
running them one by one; ``--against plan-off`` the encoder run from a plan of its fused parts' kernel
calls with the same model run layer by layer through ``_bert_layer``; ``--against tiles-off`` the
planned layers passing their activations on in the kernels' tile layout with the same plan run from
and to rows of tokens around every part.

    python scripts/bench_layer_forward.py --result 3x=out/3x --result 2x=out/2x --against HEAD~1 --rounds 21
    python scripts/bench_layer_forward.py --result 3x=out/3x --against qkv-off
    python scripts/bench_layer_forward.py --result 2.5x=out/25 --against out-off
    python scripts/bench_layer_forward.py --result 2.5x=out/25 --against plan-off
    python scripts/bench_layer_forward.py --result 2.5x=out/25 --against tiles-off
"""

from __future__ import annotations

import argparse
import functools
import inspect
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import spdy.kernels as K  # noqa: F401  - before torch: one OpenMP runtime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

import spdy  # noqa: E402
from spdy import runtime  # noqa: E402
from spdy.hardware import fingerprint  # noqa: E402
from spdy.kernels import attention as kattn  # noqa: E402
from spdy.models.minilm import load_encoder, load_minilm  # noqa: E402

#: ``--against`` these: a fusion of this tree turned off in the same model (the query, key and value
#: projections one by one instead of as one call; the attention output's residual and LayerNorm
#: after its projection instead of in its epilogue)
SWITCHES = {"qkv-off": runtime.set_qkv_fusion, "out-off": runtime.set_out_fusion, "plan-off": runtime.set_encoder_plan,
            "tiles-off": runtime.set_encoder_tiles}
#: the functions of the layer forward, by file
FUNCTIONS = {"spdy/runtime.py": ("_bert_layer", "_self_attention", "_layer_norm", "_fusable_ffn", "_fusable_qkv",
                                   "_qkv_modules_fusable", "_ffn_modules_fusable", "_fusable_out", "_children"),
             "spdy/kernels/attention.py": ("unsupported",)}


def _source(rev: str, path: str) -> str:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, check=True, capture_output=True,
                          text=True).stdout


def _function(src: str, name: str) -> str | None:
    i = src.find(f"\ndef {name}(")
    if i < 0:
        return None
    j = src.find("\ndef ", i + 5)
    k = src.find("\nclass ", i + 5)
    ends = [e for e in (j, k) if e > 0]
    return src[i:min(ends) if ends else len(src)]


def load_version(rev: str) -> tuple[Any, Any]:
    """(``_bert_layer``, ``unsupported``) as of ``rev``, bound to their own helpers of that revision."""
    got = {}
    for path, names in FUNCTIONS.items():
        src = _source(rev, path)
        ns = dict((runtime if path.endswith("runtime.py") else kattn).__dict__)
        for name in names:
            code = _function(src, name)
            if code is not None:
                exec(code, ns)  # noqa: S102 - the project's own source at another revision
        got[path] = ns
    layer = got["spdy/runtime.py"]["_bert_layer"]
    n = len(inspect.signature(layer).parameters)
    if n < len(inspect.signature(runtime._bert_layer).parameters):
        older = layer

        @functools.wraps(older)
        def layer(*args: Any) -> Any:  # an older layer forward takes fewer switches: the rest are left off
            return older(*args[:n])

    return layer, got["spdy/kernels/attention.py"]["unsupported"]


def compare(model: Any, example: Any, arms: dict[str, Callable[[], Any]], threads: int, rounds: int
            ) -> dict[str, Any]:
    """``arms``: name -> a function that sets the model up to run that arm."""
    K.set_num_threads(threads)
    ratios, times = [], {n: [] for n in arms}
    with torch.inference_mode():
        outs = {}
        for name, setup in arms.items():
            setup()
            outs[name] = model(**example).last_hidden_state
        # the epilogue's LayerNorm rounds unlike torch's: outputs agree to float32 rounding, not bit for bit
        diff = float((outs["this"] - outs["against"]).abs().max())
        if diff > 1e-3:
            raise SystemExit(f"the two versions' outputs differ by up to {diff:.2e}")
        for r in range(rounds):
            t = {}
            for name in (("against", "this") if r % 2 else ("this", "against")):
                arms[name]()
                for _ in range(3):
                    model(**example)
                s = time.perf_counter()
                for _ in range(20):
                    model(**example)
                t[name] = (time.perf_counter() - s) / 20
                times[name].append(t[name])
            ratios.append(t["this"] / t["against"])
    q = statistics.quantiles(ratios, n=4)
    return {"threads": threads, "max_abs_diff": diff, "ratio_median": statistics.median(ratios), "ratio_quartiles": [q[0], q[2]],
            "ms": {n: statistics.median(v) * 1e3 for n, v in times.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", action="append", required=True, metavar="LABEL=OUT")
    ap.add_argument("--against", default="HEAD~1",
                    help="git revision to compare with, or 'qkv-off': this tree with the query, key and value "
                         "projections run one by one (spdy.runtime.set_qkv_fusion) instead of as one call, or "
                         "'out-off': the attention output's residual and LayerNorm run after its projection "
                         "(spdy.runtime.set_out_fusion) instead of in its epilogue, or 'plan-off': the encoder "
                         "layer by layer (spdy.runtime.set_encoder_plan) instead of from a plan of its fused "
                         "parts' kernel calls, or 'tiles-off': the plan's layers from and to rows of tokens "
                         "around every part (spdy.runtime.set_encoder_tiles) instead of on the tile layout. "
                         "Against a revision both arms run layer by layer, the plan off.")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    this = (runtime._bert_layer, kattn.unsupported)
    switch = SWITCHES.get(args.against)
    other = None if switch is not None else load_version(args.against)

    def use(fns: tuple[Any, Any]) -> Callable[[], None]:
        def setup() -> None:
            runtime._bert_layer, kattn.unsupported = fns
        return setup

    example = load_minilm(n_calibration=8).example
    rows = []
    try:
        for item in args.result:
            label, _, out = item.partition("=")
            model = spdy.apply(load_encoder()[0], out, sparse=True, threads=max(args.threads))
            if switch is not None:
                arms = {"this": lambda m=model, f=switch: f(m, True), "against": lambda m=model, f=switch: f(m, False)}
            else:  # the layer functions compared: both arms without the plan, which bypasses them
                runtime.set_encoder_plan(model, False)
                arms = {"this": use(this), "against": use(other)}
            for th in args.threads:
                r = {"model": label, **compare(model, example, arms, th, args.rounds)}
                rows.append(r)
                print(f"{label:>6} {th} threads: this / {args.against} {r['ratio_median']:.4f} (quartiles "
                      f"{r['ratio_quartiles'][0]:.4f}-{r['ratio_quartiles'][1]:.4f}); {r['ms']['this']:.2f} ms vs "
                      f"{r['ms']['against']:.2f} ms (medians)", flush=True)
    finally:
        runtime._bert_layer, kattn.unsupported = this
    write_json(args.json, {"fingerprint": fingerprint(), "against": args.against, "rounds": args.rounds, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

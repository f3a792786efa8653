"""The library API: :func:`search` runs SPDY end to end, :func:`apply` deploys its result.

``search`` chains the stages: a latency profile of the model on the backend
(measured once and cached per model + hardware), a reconstruction database
(built once and cached per model + calibration set), a latency check of the
profile end to end, the sensitivity search (DP -> stitch -> calibration loss,
every evaluation an Optuna trial), the one-shot baselines for the same budget,
and an end-to-end measurement of the pruned models on the backend with a fit to
it, every measurement next to the dense model in torch eager, torch.compile and ONNX Runtime (the
target is a speedup over the ``reference`` among them, :mod:`spdy.reference`). It
returns a :class:`SearchOutcome`; with ``out`` it also writes ``result.json``, the
pruned weights (``model/``) and a plot. The stages live in :mod:`spdy.stages`,
:mod:`spdy.pipeline`, :mod:`spdy.measure` and :mod:`spdy.results` (importable from here too).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

try:  # before torch: torch and the spdy kernels then share one OpenMP pool
    import spdy.kernels  # noqa: F401
except ImportError:  # pragma: no cover - numba missing
    pass

import torch
from torch import nn

from spdy import dp
from spdy.baselines import BASELINES, check_names
from spdy.errors import InvalidInputError, ProfileMismatchError, SpdyError
from spdy.grid import SparsityGrid
from spdy.measure import (  # noqa: F401 - re-exported
    FIT_AIM, FIT_BAND, MIN_CORRECTION, SPEEDUP_TOLERANCE, MeasureConfig, Measured, baseline, check_latency, correction_factor,
    fit_to_measured, latency_correction, lowest_dp_target, measure_and_fit, measure_speedups, reachable_over,
)
from spdy.models.base import ModelBundle, get_module
from spdy.pipeline import find, search_outcome
from spdy.profile import Profile
from spdy.reference import FASTEST, REFERENCES, check_reference, open_runtimes  # noqa: F401 - re-exported
from spdy.results import (  # noqa: F401 - re-exported
    RESULT_SCHEMA, RESULT_SCHEMA_VERSION, Outcome, SearchOutcome, load_result, result_model_dir, write_outputs,
)
from spdy.stages import (  # noqa: F401 - re-exported
    CalibrationObjective, Prepared, Progress, as_bundle, cache_dir, check_reachable, database_cache_path,
    default_study_name, ensure_database, ensure_profile, open_database, open_profile, profile_cache_path, run_search,
    search_table,
)
from spdy.storage import make_storage

if TYPE_CHECKING:
    from spdy.profilers import Backend
    from spdy.sensitivity import SearchConfig

log = logging.getLogger(__name__)

#: The keyword settings :func:`search` turns into its :class:`SearchConfig` and :class:`MeasureConfig`.
SEARCH_SETTINGS = ("max_evals", "k", "delta", "seed", "strategy", "buckets", "patterns")
MEASURE_SETTINGS = tuple(f.name for f in dataclasses.fields(MeasureConfig))


def search(
    model: str | ModelBundle | nn.Module = "minilm", calibration: Sequence[Any] | None = None,
    speedup: float | str | None = None, *, backend: str | Backend = "spdy-cpu", threads: int | None = None,
    profile: str | os.PathLike[str] | Profile | None = None, database: str | os.PathLike[str] | Any | None = None,
    method: str = "obs", grid: SparsityGrid | None = None, storage: str | None = None, study: str | None = None,
    config: SearchConfig | None = None, measurement: MeasureConfig | None = None, reference: str = FASTEST,
    baselines: Sequence[str] = BASELINES, only_baseline: str | None = None, evaluate_only: bool = False,
    eval_threads: int | None = None, force: bool = False, timing: Any = None,
    loss: str | Callable[..., Any] | None = None, forward: Callable[..., Any] | None = None,
    exclude: Sequence[str] = (), out: str | os.PathLike[str] | None = None, progress: Progress | None = None,
    **settings: Any,
) -> SearchOutcome:
    """Find per-layer sparsities that meet ``speedup`` on ``backend`` with the least calibration loss.

    * ``model``: ``"minilm"``, ``"package.module:factory"``, a :class:`ModelBundle`, or an
      ``nn.Module`` together with ``calibration`` (a list of input batches).
    * ``speedup``: the target (``2``, ``"2.5x"``); default ``config.speedup``, else 2. A speedup over
      the dense model in ``reference`` (:mod:`spdy.reference`): ``"fastest"`` (the faster of torch
      eager and ONNX Runtime, measured here), ``"torch"`` or ``"onnxruntime"``.
    * ``backend``: a name, or a backend made with options (``get_backend("torch-cuda", dtype=...)``).
    * ``profile`` / ``database``: paths (or loaded objects); missing ones are measured/built
      and cached under :func:`cache_dir`.
    * ``storage`` / ``study``: Optuna storage (None: in memory; ``sqlite:///f.db``, an RDB URL
      or a journal file path) and study name. Processes sharing them share one search;
      a killed search resumes. ``evaluate_only`` makes this process a pure worker (no
      baselines, measurements or outputs).
    * ``config``: the search budget (:class:`spdy.sensitivity.SearchConfig`; its ``speedup``
      is replaced by the target); the default strategy is ``auto``
      (:func:`spdy.sensitivity.resolve_strategy`: the evolutionary search for 10-99
      evaluations, Algorithm 4 then evo from 100, Algorithm 4 below 10) with the budget of
      Algorithm 4 in full.
    * ``measurement``: the latency check, the end-to-end measurement and the fit to it
      (:class:`spdy.measure.MeasureConfig`).
    * ``**settings``: shorthands for single fields of the two: ``max_evals``, ``k``, ``delta``,
      ``seed``, ``strategy``, ``buckets``, ``patterns`` (search) and ``measure``, ``measure_rounds``,
      ``fit_rounds``, ``fit_evals``, ``calibrate`` (measurement); they override ``config``
      and ``measurement``.
    * ``only_baseline``: skip the search and report that baseline (``uniform``/``global``).
    * ``timing``: the profiler's :class:`~spdy.profilers.TimingPolicy` (default: the full one).
    * ``out``: write ``result.json``, ``model/`` (pruned weights) and ``profile.png`` there.
    """
    from spdy.profilers import get_backend

    t_all = time.perf_counter()
    cfg, mcfg = _configs(speedup, config, measurement, settings)
    target = cfg.speedup
    check_reference(reference)
    check_names((*baselines, *([only_baseline] if only_baseline else [])))
    if storage is not None and "://" in storage:
        make_storage(storage)  # a database that cannot be opened fails now, not after the profile and database
    stage: dict[str, float] = {}
    t0 = time.perf_counter()
    bundle = as_bundle(model, calibration, loss=loss, forward=forward, exclude=exclude)
    specs = bundle.layers()
    stage["load_model"] = time.perf_counter() - t0
    be = get_backend(backend, threads=threads, policy=timing) if isinstance(backend, str) else backend
    runtimes = open_runtimes(be, bundle.inference, reference) if mcfg.measure else None  # torch eager, ONNX Runtime
    t0 = time.perf_counter()
    prof, prof_path = open_profile(bundle, be, profile, specs, grid=grid, force=force, progress=progress, patterns=cfg.patterns)
    stage["profile"] = time.perf_counter() - t0
    ref = reachable_over(prof, bundle, be, runtimes, reference, cfg.patterns, target, cfg.buckets,  # before the database
                         rounds=mcfg.measure_rounds)
    t0 = time.perf_counter()
    db = open_database(bundle, prof.table, database, specs, method=method, progress=progress, patterns=cfg.patterns)
    stage["database"] = time.perf_counter() - t0
    run = Prepared(bundle, be, prof, prof_path, db, search_table(prof, cfg.patterns, db))
    study_name = study or default_study_name(bundle, cfg) + ("" if reference == FASTEST else f"-vs-{reference}")
    prev_threads = torch.get_num_threads()
    found = find(run, cfg, mcfg, storage=storage, study_name=study_name, baselines=baselines,
                 only_baseline=only_baseline, evaluate_only=evaluate_only, eval_threads=eval_threads,
                 progress=progress, stage=stage, reference=ref, runtimes=runtimes)
    if evaluate_only and only_baseline is None:
        return SearchOutcome(bundle.name, be.name, target, found.best, found.objective.dense_loss,
                             n_evaluations=found.n_evaluations, study=study_name, storage=storage,
                             stage_s=stage, per_evaluation_ms=found.per_evaluation_ms)
    best, base_out = found.best, found.baselines
    measured = None
    if mcfg.measure:
        measured = measure_and_fit(run, found.objective, target, found.dp_target, best, base_out, mcfg,
                                   searcher=found.searcher, only_baseline=only_baseline, eval_threads=eval_threads,
                                   progress=progress, reference=found.reference, runtimes=runtimes)
        stage.update(measured.stage_s)
    stage["total"] = time.perf_counter() - t_all
    outcome = search_outcome(run, cfg, found, measured, best, base_out, study_name=study_name, storage=storage,
                             eval_threads=eval_threads or prev_threads, stage=stage)
    return write_outputs(outcome, bundle, db, run.table, out) if out is not None else outcome


def _configs(speedup: float | str | None, config: SearchConfig | None, measurement: MeasureConfig | None,
             settings: dict[str, Any]) -> tuple[SearchConfig, MeasureConfig]:
    """:func:`search`'s two configs: ``config`` and ``measurement`` (or the defaults) with the
    keyword ``settings`` on top, and the search's ``speedup`` set to the target."""
    from spdy.sensitivity import SearchConfig

    unknown = sorted(set(settings) - set(SEARCH_SETTINGS) - set(MEASURE_SETTINGS))
    if unknown:
        raise TypeError(f"search() got unexpected keyword arguments {unknown}; the settings are "
                        f"{', '.join(SEARCH_SETTINGS + MEASURE_SETTINGS)}")
    if speedup is None:
        speedup = config.speedup if config is not None else 2.0
    target = dp.parse_speedup(speedup)
    search_kw = {k: v for k, v in settings.items() if k in SEARCH_SETTINGS}
    cfg = (dataclasses.replace(config, speedup=target, **search_kw) if config is not None
           else SearchConfig(speedup=target, **search_kw))
    mcfg = dataclasses.replace(measurement or MeasureConfig(), **{k: v for k, v in settings.items() if k in MEASURE_SETTINGS})
    return cfg, mcfg


def apply(
    model: nn.Module | ModelBundle,
    result: SearchOutcome | str | os.PathLike[str],
    *,
    sparse: bool = False,
    threads: int | None = None,
    fold: bool = True,
) -> nn.Module:
    """Load a search result's pruned weights into ``model`` in place and return the model in the
    form it was timed in.

    The pruned weights (and re-estimated BatchNorm statistics) go into ``model`` itself. When the
    result was timed with BatchNorms folded into the layers before them (CNNs; the manifest's
    ``batchnorm_folds``), the return value is a folded copy (:func:`spdy.fold.fold_batchnorm`)
    and ``model`` keeps its BatchNorm layers; otherwise, or with ``fold=False``, it is ``model``.
    With ``sparse=True`` the pruned layers of the returned model are also swapped for spdy's
    sparse CPU modules (:mod:`spdy.runtime`) in the kernel format the profile chose per layer
    (unpruned layers too, where the profile chose one of spdy's kernels for them),
    so that it runs as fast as was measured, and a Hugging Face model's attention, the exact
    GELUs and the depthwise convolutions (with the pads and activations they absorbed) run on
    spdy's kernels, a BERT encoder without transformers' wrappers, and each convolution with the
    residual add and activation after it in its epilogue, where they were timed that
    way (:func:`spdy.runtime.fast_base`);
    ``threads`` sets the thread count. A result timed
    on ``spdy-cpu-compiled`` comes back compiled (:func:`spdy.runtime.compile`: the model
    compiles at its first call, and again for each new input shape); ``model`` itself is the
    uncompiled module inside it.
    """
    from spdy.export import apply_buffers, apply_weights, hardware_differences, load_buffers, load_folds, load_pruned
    from spdy.fold import fold_batchnorm
    from spdy.hardware import fingerprint as hardware_fingerprint

    if isinstance(model, ModelBundle):
        model = model.model
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    model_dir = result_model_dir(result)
    weights, manifest = load_pruned(model_dir)
    moved = hardware_differences(manifest, hardware_fingerprint())
    if moved:
        log.warning("this pruned model was searched and timed on another machine (%s): its speedup and the kernel "
                    "format of each layer were measured there, not here; run spdy search on this machine for a "
                    "profile of its own", "; ".join(moved))
    for name in weights:
        try:
            get_module(model, name)
        except SpdyError as exc:
            raise ProfileMismatchError(f"{exc}; the pruned weights were made for another model "
                                       f"({manifest.get('model')!r})") from None
    apply_weights(model, weights)
    apply_buffers(model, load_buffers(model_dir))  # BatchNorm statistics re-estimated for the pruned model
    folds = load_folds(manifest)
    if fold and folds:
        model = fold_batchnorm(model, folds)  # after the statistics: the fold uses the pruned model's
    if sparse:
        from spdy import kernels, runtime

        kernels.warmup()  # starts Numba's pool (and turns off the nested OpenMP it enables)
        kernels.set_num_threads(threads if threads is not None else kernels.threads.available_cores())
        kernels.retain_freed_memory()  # as the spdy-cpu profile was measured
        swaps: dict[str, nn.Module] = {}
        # the pruned layers, then the unpruned ones that were timed in a kernel format of spdy's
        # (older manifests do not record those: they stay torch's)
        formats = {**{n: info.get("format", "auto") for n, info in manifest["layers"].items()},
                   **{n: f for n, f in (manifest.get("unpruned_formats") or {}).items() if n not in manifest["layers"]}}
        for name, fmt in formats.items():
            mod = get_module(model, name)
            if fmt == "dense":
                continue
            if isinstance(mod, nn.Linear):
                swaps[name] = runtime.SparseLinear.from_linear(mod, format=fmt if fmt in runtime.FORMATS else "auto")
            elif isinstance(mod, nn.Conv2d):
                swaps[name] = runtime.SparseConv2d.from_conv(mod, format=fmt if fmt in runtime.CONV_FORMATS else "auto")
        runtime.swap_modules(model, {n: m.eval() for n, m in swaps.items()})
        timed = manifest.get("fingerprint") or {}
        if timed.get("attention") == "spdy":
            runtime.fast_attention(model)  # timed with spdy's attention kernel: the same here
        if timed.get("gelu") == "spdy":
            runtime.fast_gelu(model)
        if timed.get("encoder") == "spdy":  # after fast_attention: it switches encoders on spdy's attention
            runtime.fast_encoder(model)
        fusions = None
        if timed.get("depthwise") == "spdy":  # with the pads and activations each absorbed when timed
            # the fusions chain in the folded form only (a BatchNorm sits between conv and activation otherwise)
            found = manifest.get("depthwise_fusions") if fold or not folds else None
            fusions = None if found is None else [runtime.DepthwiseFusion.from_json(f) for f in found]
            runtime.fast_depthwise(model, fusions)
        if timed.get("conv_epilogue") == "fused":  # after the depthwise swaps, as when timed
            runtime.fuse_conv_epilogues(model)
            runtime.fuse_conv_activations(model, fusions or ())  # the activations the traced blocks leave
        if manifest.get("backend") == "spdy-cpu-compiled":
            # timed compiled: the same here (the model compiles at its first call)
            return runtime.compile(model)
    return model



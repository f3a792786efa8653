"""Profile a model on a backend, and check the profile against end-to-end runs.

``profile_model`` times every prunable layer at every grid level (the fastest kernel
format the runtime offers at that level) plus the base time, measured in the same
runtime as the model with every prunable layer replaced by a zero-cost stand-in
(interleaved with runs of the whole model, so that its caches are as cold as in a
real forward), so that ``base + sum_l t[l][s_l]`` predicts the whole model's time.

``validate`` draws random level vectors, runs each pruned model end to end in that
runtime (interleaved with one another), and records predicted against measured time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spdy.errors import InvalidInputError
from spdy.grid import DEFAULT_GRID, SparsityGrid
from spdy.models.base import ModelBundle, get_module
from spdy.profile import Profile
from spdy.profilers.base import DENSE, STANDIN, Backend, LayerChoice, Timing
from spdy.profilers.pruning import LevelPruner, random_level_vectors
from spdy.types import LatencyTable, LayerSpec

log = logging.getLogger(__name__)

#: ``progress(done, total, what)``: called after each step (one per layer, base, validation).
Progress = Callable[[int, int, str], None]


def _weight_bias(bundle: ModelBundle, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    mod = get_module(bundle.model, name)
    w = mod.weight.detach().cpu().float().numpy()
    b = None if getattr(mod, "bias", None) is None else mod.bias.detach().cpu().float().numpy()
    return np.ascontiguousarray(w), b


def model_settings(bundle: ModelBundle, specs: Sequence[LayerSpec]) -> dict[str, Any]:
    """Batch, sequence length (for token inputs) and the example's input shapes."""
    import torch

    shapes: dict[str, list[int]] = {}
    ex = bundle.example
    items = ex.items() if isinstance(ex, dict) else enumerate(ex) if isinstance(ex, (tuple, list)) else [("input", ex)]
    for k, v in items:
        if isinstance(v, torch.Tensor):
            shapes[str(k)] = list(v.shape)
    first = specs[0].input_shape
    out: dict[str, Any] = {"batch": int(first[0]), "example_shapes": shapes}
    if specs[0].kind == "linear" and len(first) == 3:
        out["seq_len"] = int(first[1])
    return out


def profile_model(
    bundle: ModelBundle,
    backend: Backend,
    grid: SparsityGrid = DEFAULT_GRID,
    specs: Sequence[LayerSpec] | None = None,
    progress: Progress | None = None,
    patterns: Sequence[str] | str = (),
) -> Profile:
    """Measure the latency table of ``bundle``'s prunable layers on ``backend``.

    ``patterns`` (``"2:4"``, ...) also times each layer with its weight pruned to that N:M
    pattern, in the backend's kernels for it (:meth:`Backend.pattern_formats`) or dense,
    and records it in the profile's ``pattern_times`` (``+inf`` where the backend has no
    kernel for the pattern on that layer; see :mod:`spdy.choices`).
    """
    from spdy.choices import parse_patterns
    from spdy.profilers.torch_backends import capture_layer_io

    patterns = parse_patterns(patterns)
    specs = list(specs) if specs is not None else bundle.layers()
    names = [s.name for s in specs]
    t_start = time.perf_counter()
    io = capture_layer_io(bundle.model, bundle.example, bundle.forward, names)
    layers = []
    for spec in specs:
        w, b = _weight_bias(bundle, spec.name)
        layers.append((spec, w, b, io[spec.name][0].float().numpy()))
    del io
    passes = max(1, backend.policy.passes)
    total = len(specs) * passes + 1
    base_plan = {n: LayerChoice(STANDIN) for n in names}
    # The base is timed interleaved with the whole unpruned model: alone, its own data stays in
    # the caches from one call to the next (measured 2.6 ms for MiniLM on spdy-cpu), while
    # inside a real forward the layers' weights stream through them in between (3.2 ms).
    context_plan = {spec.name: LayerChoice(DENSE, w, b, 0.0) for spec, w, b, _ in layers}
    base_runs: list[Timing] = []
    results = backend.time_layers(
        layers, grid.levels, on_layer=(lambda d, _t, w: progress(d, total, w)) if progress else None,
        after_pass=lambda _p: base_runs.append(backend.time_models(bundle, [base_plan, context_plan])[0]),
        **({"patterns": patterns} if patterns else {}),
    )
    S = len(grid)
    pattern_results = [lts[S:] for lts in results]
    results = [lts[:S] for lts in results]
    times = np.array([[lt.time_s for lt in lts] for lts in results])
    spread = np.array([[lt.spread for lt in lts] for lts in results])
    formats = [tuple(lt.fmt for lt in lts) for lts in results]
    pattern_fields: dict[str, Any] = {}
    if patterns:
        pattern_fields = {
            "patterns": patterns,
            "pattern_times": np.array([[lt.time_s for lt in lts] for lts in pattern_results]),
            "pattern_spread": np.array([[lt.spread for lt in lts] for lts in pattern_results]),
            "pattern_formats": tuple(tuple(lt.fmt for lt in lts) for lts in pattern_results),
        }
        for k, p in enumerate(patterns):
            n_kernel = int(np.isfinite(pattern_fields["pattern_times"][:, k]).sum())
            if n_kernel == 0:
                log.warning("%s has no %s kernel for any layer of %s; the pattern is not a choice here",
                            backend.name, p, bundle.name)
            else:
                log.info("%s: %d of %d layers have a %s kernel", backend.name, n_kernel, len(specs), p)
    dense_plan = {}  # the unpruned model, each layer in its fastest format at level 0 (what dense_total_s predicts)
    for spec, (_, w, b, _), fmts in zip(specs, layers, formats):
        dense_plan[spec.name] = LayerChoice(fmts[0], w, b, 0.0)
    # the base: median over the passes (timed after each); the unpruned model once, as a check
    base_s = float(np.median([t.median_s for t in base_runs]))
    base_spread = float(np.median([t.spread for t in base_runs]))
    dense = backend.time_model(bundle, dense_plan)
    if progress:
        progress(total, total, "base")
    table = LatencyTable(tuple(names), grid, times, base_s, backend.fingerprint())
    predicted_dense = table.dense_total_s
    log.info("base %.2f ms (spread %.1f%%); dense model measured %.2f ms, predicted %.2f ms (%+.1f%%)",
             base_s * 1e3, base_spread * 100, dense.median_s * 1e3, predicted_dense * 1e3,
             (predicted_dense / dense.median_s - 1) * 100)
    settings = {
        **backend.settings(),
        **model_settings(bundle, specs),
        "base_spread": base_spread,
        "base_passes_s": [t.median_s for t in base_runs],
        "dense_measured_s": dense.median_s,
        "profile_seconds": round(time.perf_counter() - t_start, 1),
        "samples": dict(backend.stats),
    }
    return Profile(
        table=table,
        backend=backend.name,
        model=bundle.name,
        specs=tuple(specs),
        settings=settings,
        spread=spread,
        formats=tuple(formats),
        **pattern_fields,
    )


def level_plans(profile: Profile, bundle: ModelBundle, level_vectors: np.ndarray) -> list[dict[str, LayerChoice]]:
    """For each level vector, every layer magnitude-pruned to its level in the profile's format for it."""
    t = profile.table
    if profile.formats is None:
        raise InvalidInputError("the profile records no kernel format per level; re-run 'spdy profile' to get one")
    plans: list[dict[str, LayerChoice]] = [{} for _ in level_vectors]
    for li, name in enumerate(t.layers):
        w, b = _weight_bias(bundle, name)
        pruner = LevelPruner(w)
        pruned: dict[int, np.ndarray] = {}
        for plan, lv in zip(plans, level_vectors):
            i = int(lv[li])
            if i not in pruned:
                pruned[i] = pruner.at(t.grid[i])
            plan[name] = LayerChoice(profile.formats[li][i], pruned[i], b, t.grid[i])
    return plans


def validate(
    profile: Profile,
    bundle: ModelBundle,
    backend: Backend,
    k: int = 5,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[dict[str, float]]:
    """Time ``k`` random pruned models end to end and compare with the profile's predictions.

    Level vectors are uniform over the grid, per layer. Each pruned model uses, per layer,
    the format the profile chose for that level; the ``k`` models are timed interleaved.
    The base model (all stand-ins) is timed with them, as a check that the machine runs as
    fast as when the profile was measured. Returns ``[{"predicted_s", "measured_s",
    "spread", "base_measured_s"}]``, one per model.
    """
    if profile.backend != backend.name:
        raise InvalidInputError(
            f"the profile was made with backend {profile.backend!r}; validate it with that backend, not {backend.name!r}"
        )
    if k < 1:
        return []
    profile.check_model(bundle.layers())
    t = profile.table
    vectors = random_level_vectors(len(t.layers), len(t.grid), k, seed)
    plans = level_plans(profile, bundle, vectors)
    # the base model is timed with them: if the machine's speed drifted since the profile was
    # measured, base_measured_s / the profile's base shows it
    *timings, base_now = backend.time_models(bundle, [*plans, {n: LayerChoice(STANDIN) for n in t.layers}])
    drift = base_now.median_s / t.base_s - 1 if t.base_s > 0 else float("nan")
    records = []
    for lv, tm in zip(vectors, timings):
        rec = {"predicted_s": t.predicted_time(lv), "measured_s": tm.median_s, "spread": tm.spread,
               "base_measured_s": base_now.median_s}
        records.append(rec)
        log.info("random profile: predicted %.2f ms, measured %.2f ms (%+.1f%%)", rec["predicted_s"] * 1e3,
                 rec["measured_s"] * 1e3, (rec["predicted_s"] / rec["measured_s"] - 1) * 100)
    log.info("base time now %.2f ms, in the profile %.2f ms (%+.1f%%)", base_now.median_s * 1e3, t.base_s * 1e3,
             drift * 100)
    if abs(drift) > 0.1:
        log.warning("the base model runs %+.0f%% %s than when the profile was measured: the machine's speed "
                    "changed (other load, frequency); predictions are off by about as much", drift * 100,
                    "slower" if drift > 0 else "faster")
    if progress:
        progress(k, k, "validation")
    return records


def validation_error(records: Sequence[dict[str, float]]) -> float:
    """Median of ``|predicted - measured| / measured`` over the records (nan if none)."""
    if not records:
        return float("nan")
    return float(np.median([abs(r["predicted_s"] - r["measured_s"]) / r["measured_s"] for r in records]))

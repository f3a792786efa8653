"""Profile a model on a backend, and check the profile against end-to-end runs.

``profile_model`` times every prunable layer at every grid level (the fastest kernel
format the runtime offers at that level) plus the base time, measured in the same
runtime as the model with every prunable layer replaced by a zero-cost stand-in, so
that ``base + sum_l t[l][s_l]`` predicts the whole model's time. No time in the table
depends on when it was measured: levels are kept as ratios to the dense kernel timed
interleaved with them, and one interleaved measurement of the dense layers, the base,
the dense model and two uniformly pruned ones sets the scale. An entry's time is
cross-fitted (the format picked on half of the passes, timed by the others) and an
in-model time (:mod:`spdy.profilers.in_model`).

``validate`` draws random pruned models, runs each end to end in that runtime
(interleaved with one another, with the dense model and with the profile's state
probes), and records predicted against measured time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from spdy.choices import Choice
from spdy.errors import InvalidInputError
from spdy.grid import DEFAULT_GRID, SparsityGrid
from spdy.models.base import ModelBundle, get_module
from spdy.profile import Profile
from spdy.profilers.base import DENSE, NO_KERNEL, SERIAL_SUFFIX, STANDIN, Backend, LayerChoice, LevelTiming, Timing, format_rank
from spdy.profilers.dense_runtimes import DenseRuntimes, time_with_runtimes
from spdy.profilers.in_model import InModelTerms, fit_terms, layer_groups, model_features, spanning_level_vectors
from spdy.profilers.plans import backend_plan
from spdy.profilers.pruning import LevelPruner
from spdy.types import FUSED_FORMATS, FusedPair, LatencyTable, LayerSpec, PlannedLayer

log = logging.getLogger(__name__)

#: ``progress(done, total, what)``: called after each step (one per layer, base, validation).
Progress = Callable[[int, int, str], None]
#: ``(spec, dense weight, bias, real input)`` of one prunable layer.
_Layer = tuple[LayerSpec, np.ndarray, "np.ndarray | None", np.ndarray]
#: One format's candidate time at one entry: (seconds, spread[, (seconds over even passes, over odd)]).
_Cand = tuple[Any, ...]
#: Random pruned models the in-model terms are fitted on.
DEFAULT_FIT_MODELS = 24
#: The fit's random models are drawn with ``seed + FIT_SEED_OFFSET``, so that :func:`validate`
#: (``seed``) checks the terms on other models.
FIT_SEED_OFFSET = 10_000
#: The way tables are measured and fitted; cached profiles of another version are measured again.
#: 2: in-model terms for the rest of the pass with the unpruned and two uniformly pruned models
#: as equations, state probes, cross-fitted entries. 3: the ``dnnl`` format (oneDNN-packed dense
#: weights) among spdy-cpu's formats, and the spdy-cpu-compiled backend. 4: the parallel sparse
#: kernels split token tiles between threads (sparse layers on 2 threads up to 4x faster), and
#: sparse 1x1 convolutions run as Linear layers over the pixels. 5: the implicit conv kernel splits
#: images (or pixel tiles) between threads, not output rows. 6: fused pairs (a BERT feed-forward
#: whose two projections are sparse runs as one block) and their measured saving. 7: the block
#: runs the LayerNorm after the residual too. 8: the encoder's layer forward trimmed of serial
#: Python (submodules read from their dicts, the attention mask checked without
#: torch.broadcast_shapes): the base about 0.1-0.3 ms shorter. 9: whole models are timed in a
#: shuffled order each round (:attr:`TimingPolicy.shuffle`), so that no model always follows the
#: same one. 10: a BERT self-attention's query, key and value projections run as one call where all
#: three are sparse, and the table takes a third of the measured saving off each. 11: a BERT
#: self-attention's output projection runs with the residual and the LayerNorm in its epilogue where
#: it is sparse, and the table takes the measured saving off its sparse times. 12: the in-model
#: per-weight term counts the weight values a format stores (every value of a non-empty 4-wide
#: block in the blocked formats, every value in the dense ones), not the nonzeros.
#: 13: every competitive format's in-model factor, from probes timed unfused with the anchor (the
#: format on half the layers, among a background near 80%; :func:`_format_factors`), scales its loop
#: times before the formats are picked; a format that does not fuse must beat one that does by the
#: whole group's saving to be picked. 14: a convolution runs the residual add and the activation
#: that alone read its output in its epilogue (the base's stand-ins take them too), convolutions
#: are also timed packed for oneDNN (``dnnl``, channels_last), and the sparse ones keep the
#: memory format of their input; a pruned level whose fastest format is a dense one is timed as
#: the unpruned level (:func:`_dense_as_unpruned`). 15: every convolution takes and gives
#: channels_last, so conv layers are timed alone on channels-last inputs and the base's conv
#: stand-ins give channels-last outputs (``channels_last_convs``); convolutions that a model's
#: untraceable forward calls take their activation too (:func:`spdy.runtime.fuse_conv_activations`);
#: a depthwise convolution on oneDNN pads wider on one side with zero taps, not a copy. 16: a BERT
#: encoder runs its fused parts from a plan of their kernel calls made once per input shape
#: (:class:`spdy.kernels.encoder.EncoderPlan`), where all its parts are fused; the groups' savings
#: are measured layer by layer and the plan's saving apart (a third of it added to each group's), and
#: the attention copies each head's values side by side before ``P V``. 17: a planned layer whose
#: parts all fuse passes its activations on in the kernels' tile layout, the attention included
#: (:meth:`spdy.kernels.encoder.EncoderPlan.tiled_layer`), which the plan's saving takes in.
LATENCY_MODEL_VERSION = 17
#: Uniformly pruned models timed with the base and the unpruned model (the nearest grid levels).
ANCHOR_SPARSITIES = (0.7, 0.95)
#: Grid levels (the nearest) at which every competitive format is probed with the anchor, besides
#: the unpruned model: its in-model factor (:func:`_probes`, :func:`_format_factors`).
PROBE_SPARSITIES = (0.4, 0.6, 0.8, 0.9, 0.95)
#: The grid level (the nearest) of the background layers the format probes run among.
PROBE_BACKGROUND = 0.8
#: Bounds of a format's in-model factor (its layers' time inside the model over their loop time).
FACTOR_BOUNDS = (0.5, 3.0)
#: Uniformly pruned models whose fused pairs are timed fused and unfused (the nearest grid levels).
FUSION_SPARSITIES = (0.8, 0.95)
#: Times the samples of a model timing that the fused and unfused models get.
FUSION_REPEATS = 4
#: Fit models that :func:`validate` times again to measure how the machine's state moved since the
#: profile, chosen to span the fit's models from the sparsest to the densest (:func:`spanning_probes`).
STATE_PROBES = 4


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


@dataclass
class _Group:
    """Layers measured together: one shape group (or one layer, when measurements are not shared)."""

    key: str
    members: list[int]
    # per entry (grid levels, then patterns), per format: (ratio to dense, spread) of each pass
    ratios: list[dict[str, list[tuple[float, float]]]] = field(default_factory=list)
    dense_pass_s: list[float] = field(default_factory=list)

    def median_ratios(self, entry: int) -> dict[str, tuple[float, float]]:
        return {f: (float(np.median([r for r, _ in v])), float(np.median([s for _, s in v])))
                for f, v in self.ratios[entry].items()}

    def half_medians(self, entry: int) -> dict[str, tuple[float, float]]:
        """Per format: the median ratio over the even passes and over the odd ones (one pass: twice that)."""
        out = {}
        for f, v in self.ratios[entry].items():
            r = np.array([x for x, _ in v])
            out[f] = (float(np.median(r[0::2])), float(np.median(r[1::2] if len(r) > 1 else r)))
        return out

    def best_format(self, entry: int) -> str:
        """The format with the lowest median ratio at ``entry`` (:func:`~spdy.profilers.base.format_rank`)."""
        return min(self.median_ratios(entry).items(), key=lambda kv: format_rank(kv[0], kv[1][0]))[0]


def _capture_layers(bundle: ModelBundle, specs: Sequence[LayerSpec]) -> list[_Layer]:
    from spdy.profilers.torch_backends import capture_layer_io

    io = capture_layer_io(bundle.model, bundle.example, bundle.forward, [s.name for s in specs])
    layers = []
    for spec in specs:
        w, b = _weight_bias(bundle, spec.name)
        layers.append((spec, w, b, io[spec.name][0].float().numpy()))
    return layers


def _measurement_groups(backend: Backend, specs: Sequence[LayerSpec]) -> list[_Group]:
    """Shape groups when the backend's layer times do not depend on the model around the layer."""
    if not backend.shares_layer_measurements():
        return [_Group(s.name, [i]) for i, s in enumerate(specs)]
    keys, index = layer_groups(specs)
    return [_Group(k, [int(i) for i in np.flatnonzero(index == g)]) for g, k in enumerate(keys)]


def _n_passes(backend: Backend, groups: Sequence[_Group]) -> int:
    """The policy's passes; with shared measurements, up to 4x as many (the time saved goes into
    passes, each timing another member of every group)."""
    p = max(1, backend.policy.passes)
    return max(p, min(max(len(g.members) for g in groups), 4 * p))


def _time_groups(
    backend: Backend, layers: Sequence[_Layer], groups: list[_Group], levels: Sequence[float],
    patterns: Sequence[str], progress: Progress | None, total: int,
    after_pass: Callable[[int], None] | None = None,
) -> None:
    """Every group at every level, in round-robin passes; each pass keeps ratios to the dense
    kernel timed interleaved with the levels, so a slow minute cancels out."""
    passes = _n_passes(backend, groups)
    step = 0
    for p in range(passes):
        if p and after_pass is not None:
            after_pass(p)
        for g in (groups if p % 2 == 0 else groups[::-1]):
            spec, w, b, x = layers[g.members[p % len(g.members)]]
            allowed = None
            if g.ratios:
                allowed = [_competitive_formats(g.median_ratios(e), backend.policy.race_ratio)
                           for e in range(len(g.ratios))]
            lts = backend.time_layer_levels(spec, w, b, levels, x, allowed, patterns=patterns)
            _add_ratios(g, lts, backend.layer_call_overhead_s())
            step += 1
            if progress is not None:
                progress(step, total, spec.name)


def _add_ratios(g: _Group, lts: Sequence[LevelTiming], overhead: float) -> None:
    ref = max(lts[0].candidates[DENSE].median_s - overhead, 1e-12)
    g.dense_pass_s.append(ref)
    if not g.ratios:
        g.ratios = [{} for _ in lts]
    for e, lt in enumerate(lts):
        for f, t in lt.candidates.items():
            g.ratios[e].setdefault(f, []).append((max(t.median_s - overhead, 0.0) / ref, t.spread))


def _competitive_formats(ratios: dict[str, tuple[float, float]], race_ratio: float) -> tuple[str, ...]:
    if not ratios:
        return ()
    best = min(r for r, _ in ratios.values())
    return tuple(f for f, (r, _) in ratios.items() if f == DENSE or r <= race_ratio * best)


def _anchor_entries(levels: Sequence[float], sparsities: Sequence[float] = ANCHOR_SPARSITIES) -> list[int]:
    """The grid levels of the anchor's models: the unpruned model, and uniform ones near each of
    ``sparsities`` (distinct, above 0)."""
    out = [0]
    for s in sparsities:
        e = int(np.argmin([abs(float(x) - s) for x in levels]))
        if e > 0 and e not in out:
            out.append(e)
    return out


@dataclass(frozen=True)
class _Probe:
    """A model the format probes time (unfused): each layer at grid entry ``entries[i]`` in format
    ``formats[i]``; ``fmt`` the format probed at ``entry`` (None: the background alone)."""

    entry: int
    fmt: str | None
    entries: tuple[int, ...]
    formats: tuple[str, ...]


def _probes(backend: Backend, groups: Sequence[_Group], specs: Sequence[LayerSpec], levels: Sequence[float]
            ) -> list[_Probe]:
    """The format probes. First the background: every layer at the grid level nearest
    :data:`PROBE_BACKGROUND` in its fastest format there. Then, at the unpruned model and the grid
    levels nearest :data:`PROBE_SPARSITIES`, every format some group timed within the policy's race
    ratio of its fastest there (the formats that read the whole weight whatever its zeros, on the
    unpruned model only) on half the layers, in every shape group, with the background on the
    others: as in a searched model, the probed layers run among sparse ones, and a format that is
    fast among its own kind but slow among spdy's sparse kernels (torch's dense layers, measured
    so) shows it. A probe that would be the background itself (its format at its level) is left
    out: the background's time measures it."""
    n = len(specs)
    _keys, group = layer_groups(specs)
    bg_entry = _anchor_entries(levels, (PROBE_BACKGROUND,))[-1]
    bg = _anchor_formats(groups, n, bg_entry)
    # half of each shape group's layers, alternating within the group
    seen: dict[int, int] = {}
    half = []
    for i in range(n):
        seen[int(group[i])] = seen.get(int(group[i]), -1) + 1
        half.append(seen[int(group[i])] % 2 == 0)
    out = [_Probe(bg_entry, None, (bg_entry,) * n, tuple(bg))]
    race = backend.policy.race_ratio
    for e in _anchor_entries(levels, PROBE_SPARSITIES):
        best = _anchor_formats(groups, n, e)
        timed: list[set[str]] = [set() for _ in range(n)]
        for g in groups:
            for i in g.members:
                timed[i] = set(g.ratios[e])
        for f in sorted({f for g in groups for f in _competitive_formats(g.median_ratios(e), race)}):
            if e and f in _DENSE_READS:
                continue
            probe = _Probe(e, f, tuple(e if half[i] else bg_entry for i in range(n)),
                           tuple((f if f in timed[i] else best[i]) if half[i] else bg[i] for i in range(n)))
            if (probe.entries, probe.formats) != (out[0].entries, out[0].formats):
                out.append(probe)
    return out


def _probe_plans(layers: Sequence[_Layer], levels: Sequence[float], probes: Sequence[_Probe],
                 pruners: Sequence[LevelPruner]) -> Iterator[dict[str, LayerChoice]]:
    """The probes' plans, one at a time (a runner built from each holds its own kernels' copy of the
    weights, and the pruned weights go once the last plan is made); a layer's weight at a level is
    pruned once and shared by every plan that has it (all of them have the background's)."""
    pruned: dict[tuple[int, float], np.ndarray] = {}

    def weight(li: int, w: np.ndarray, s: float) -> np.ndarray:
        if not s:
            return w
        if (li, s) not in pruned:
            pruned[li, s] = pruners[li].at(s)
        return pruned[li, s]

    for p in probes:
        yield {spec.name: LayerChoice(fmt, weight(li, w, float(levels[e])), b, float(levels[e]))
               for li, ((spec, w, b, _x), e, fmt) in enumerate(zip(layers, p.entries, p.formats))}


def _format_factors(probes: Sequence[_Probe], timings: Sequence[Timing], base_s: float,
                    cands: Sequence[Sequence[dict[str, _Cand]]], n_entries: int
                    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Per format, per grid entry: how much longer its layers take inside the model than in the
    loop. The background's factor is its model's time less the base over its layers' loop times (in
    one format, that format's factor at its level); a
    probe's, its model's time less the base and the other layers' in-model times (the background's
    at its factor, loop times for any others), over the probed layers' loop times; clipped to
    :data:`FACTOR_BOUNDS`. Between probed entries a format's factor is interpolated, beyond them the
    nearest one holds. The loop does not rank the kernels as the model does: on an Intel Xeon host,
    among a MiniLM's sparse layers, ``bcsr4x1`` ran 1.2-1.6x its loop time, ``csr`` 1.0-1.2x and
    torch's dense layers about twice. Returns the factors and a record per probe (the background first)."""
    def loop(p: _Probe, which: Callable[[int, str], bool]) -> float:
        return sum(cands[li][e][f][0] for li, (e, f) in enumerate(zip(p.entries, p.formats)) if which(li, f))

    background, t_bg = probes[0], timings[0]
    k_bg = float(np.clip((t_bg.median_s - base_s) / max(loop(background, lambda _li, _f: True), 1e-12),
                         *FACTOR_BOUNDS))
    records = [{"entry": background.entry, "format": None, "layers": len(background.formats),
                "measured_s": t_bg.median_s, "factor": k_bg}]
    measured: dict[tuple[int, str], float] = {}
    if len(set(background.formats)) == 1:  # the background in one format measures that format at its level
        measured[background.entry, background.formats[0]] = k_bg
    for p, t in zip(probes[1:], timings[1:]):
        probed = [p.entries[li] == p.entry and f == p.fmt for li, f in enumerate(p.formats)]
        own = loop(p, lambda li, _f: probed[li])
        in_bg = loop(p, lambda li, f: not probed[li] and p.entries[li] == background.entry
                     and f == background.formats[li])
        other = loop(p, lambda li, f: not probed[li] and not (p.entries[li] == background.entry
                                                              and f == background.formats[li]))
        if own <= 0:
            continue
        k = float(np.clip((t.median_s - base_s - k_bg * in_bg - other) / own, *FACTOR_BOUNDS))
        measured[p.entry, p.fmt] = k
        records.append({"entry": p.entry, "format": p.fmt, "layers": int(sum(probed)), "measured_s": t.median_s,
                        "factor": k})
    factors = {}
    for f in sorted({f for _e, f in measured}):
        es = sorted(e for e, g in measured if g == f)
        factors[f] = np.interp(np.arange(n_entries), es, [measured[e, f] for e in es])
    return factors, records


def _scaled(cands: Sequence[Sequence[dict[str, _Cand]]], factors: dict[str, np.ndarray], n_entries: int
            ) -> list[list[dict[str, _Cand]]]:
    """``cands`` with each format's loop times at the grid's entries times its in-model factor there; a
    format no probe ran takes the largest factor at that entry (no format wins on a loop time the
    model was not seen to keep). Entries past the grid (N:M patterns) stay as they are."""
    if not factors:
        return [list(entries) for entries in cands]
    top = np.max(np.vstack(list(factors.values())), axis=0)
    out = []
    for entries in cands:
        row = []
        for e, c in enumerate(entries):
            if e >= n_entries:
                row.append(c)
                continue
            scaled = {}
            for f, cand in c.items():
                k = float(factors[f][e] if f in factors else top[e])
                scaled[f] = (cand[0] * k, cand[1], *(((cand[2][0] * k, cand[2][1] * k),) if len(cand) > 2 else ()))
            row.append(scaled)
        out.append(row)
    return out


def _anchor(
    backend: Backend, bundle: ModelBundle, layers: Sequence[_Layer], groups: Sequence[_Group], levels: Sequence[float],
    pruners: Sequence[LevelPruner], unfused: Iterable[Mapping[str, LayerChoice]] = (),
) -> tuple[np.ndarray, Timing, list[tuple[int, Timing]], list[Timing]]:
    """One long interleaved measurement of every group's dense layer, the base model (stand-ins),
    the unpruned model and uniformly pruned ones (:func:`_anchor_entries`), each layer in the
    fastest format at its level, and the ``unfused`` plans (:meth:`Backend.unfused_runner`): the
    absolute scale of the ratios, and what the rest of the pass costs in whole models, all from
    the same minutes. Returns the dense layers' seconds, the base's timing, ``[(grid level,
    timing)]`` of the models (the unpruned one first) and the unfused plans' timings."""
    runners = []
    for g in groups:
        spec, w, b, x = layers[g.members[0]]
        runners.append(backend.layer_runner(spec, LayerChoice(DENSE, w, b, 0.0), x))
    names = [spec.name for spec, *_ in layers]
    runners.append(backend.model_runner(bundle, {n: LayerChoice(STANDIN) for n in names}))
    entries = _anchor_entries(levels)
    for e in entries:
        s = float(levels[e])
        plan = {spec.name: LayerChoice(fmt, pr.at(s) if s else w, b, s)
                for (spec, w, b, _x), pr, fmt in zip(layers, pruners, _anchor_formats(groups, len(layers), e))}
        runners.append(backend.model_runner(bundle, plan))
    runners += [backend.unfused_runner(bundle, plan) for plan in unfused]
    policy = backend.policy.for_models()
    timings = backend.measure(runners, policy=replace(policy, min_repeats=2 * policy.min_repeats,
                                                          max_repeats=2 * policy.max_repeats,
                                                          max_seconds=2 * policy.max_seconds))
    overhead = backend.layer_call_overhead_s()
    dense_layer = np.array([max(t.median_s - overhead, 0.0) for t in timings[:len(groups)]])
    models = timings[len(groups) + 1:len(groups) + 1 + len(entries)]
    return dense_layer, timings[len(groups)], list(zip(entries, models)), timings[len(groups) + 1 + len(entries):]


def _fusion_saving(backend: Backend, bundle: ModelBundle, layers: Sequence[_Layer], groups: Sequence[_Group],
                   levels: Sequence[float], pruners: Sequence[LevelPruner], pairs: Sequence[tuple[int, ...]],
                   make: Callable[[Any, Mapping[str, LayerChoice]], tuple[Any, Any]] | None = None,
                   what: str = "pairs") -> tuple[float, dict[str, Any]]:
    """What one fused pair (or other group of layers the runtime runs as one: ``pairs`` holds
    the groups, ``make`` the backend's runners fused and not, default :meth:`Backend.fusion_runners`)
    saves per pass, in seconds, and the record of its measurement (its count under ``what``).

    Uniformly pruned models (the grid levels nearest :data:`FUSION_SPARSITIES`; every layer in its
    fastest format, the groups' layers in their fastest format that fuses) are timed end to end
    fused and with each layer on its own, all interleaved: the saving is the difference over the
    number of groups, averaged over the levels, and never below zero. For a feed-forward pair it
    holds the pair's own relayouts, the GELU, the residual add and the LayerNorm that the base runs
    on their own, and the dispatches between them; for a query-key-value triple, two packings of
    the input, two dispatches and two module calls; for an attention output projection with the
    residual and the LayerNorm in its epilogue, torch's add and LayerNorm and a pass of the sum
    through memory.
    """
    if not pairs:
        return 0.0, {}
    make = make or backend.fusion_runners
    group_of = {i: g for g in groups for i in g.members}
    entries = _anchor_entries(levels, FUSION_SPARSITIES)[1:]
    runners, used = [], []
    for e in entries:
        fm = _anchor_formats(groups, len(layers), e)
        ok = True
        for i in {k for p in pairs for k in p}:
            ratios = {f: r for f, (r, _s) in group_of[i].median_ratios(e).items() if f in FUSED_FORMATS}
            if not ratios:
                ok = False
                break
            fm[i] = min(ratios, key=lambda f: ratios[f])
        if not ok:
            continue
        s = float(levels[e])
        plan = {spec.name: LayerChoice(f, pr.at(s), b, s) for (spec, _w, b, _x), pr, f in zip(layers, pruners, fm)}
        runners += list(make(bundle, plan))
        used.append(e)
    if not runners:
        log.warning("no level has a format that fuses for every layer of the fused %s; they are not counted", what)
        return 0.0, {what: len(pairs), "saving_s": 0.0, "levels": []}
    # the saving is a small difference of two model times: four times the samples of a model timing
    policy = backend.policy.for_models()
    timings = backend.measure(runners, policy=replace(policy, min_repeats=FUSION_REPEATS * policy.min_repeats,
                                                      max_repeats=FUSION_REPEATS * policy.max_repeats,
                                                      max_seconds=FUSION_REPEATS * policy.max_seconds))
    fused = [t.median_s for t in timings[0::2]]
    alone = [t.median_s for t in timings[1::2]]
    per = [(a - f) / len(pairs) for f, a in zip(fused, alone)]
    saving = max(0.0, float(np.mean(per)))
    log.info("fused %s: %d, saving %.1f us each (levels %s: fused %s ms, alone %s ms)", what, len(pairs),
             saving * 1e6, [round(float(levels[e]), 3) for e in used], [round(x * 1e3, 2) for x in fused],
             [round(x * 1e3, 2) for x in alone])
    return saving, {what: len(pairs), "saving_s": saving, "levels": [float(levels[e]) for e in used],
                    "fused_s": fused, "alone_s": alone, "saving_per_level_s": per}


def _anchor_formats(groups: Sequence[_Group], n_layers: int, entry: int = 0) -> list[str]:
    """Per layer: its group's fastest format at ``entry`` in the loop (how the anchor runs that model)."""
    out = [DENSE] * n_layers
    for g in groups:
        for i in g.members:
            out[i] = g.best_format(entry)
    return out


def _candidate_times(groups: Sequence[_Group], dense_layer: np.ndarray, n_layers: int
                     ) -> list[list[dict[str, _Cand]]]:
    """``[layer][entry] -> {format: (seconds alone, spread, (seconds over the even passes, over the odd))}``:
    each group's ratios times its anchored dense time."""
    out: list[list[dict[str, _Cand]]] = [[] for _ in range(n_layers)]
    for g, d in zip(groups, dense_layer):
        per_entry = []
        for e in range(len(g.ratios)):
            halves = g.half_medians(e)
            per_entry.append({f: (r * d, s, (halves[f][0] * d, halves[f][1] * d))
                              for f, (r, s) in g.median_ratios(e).items()})
        for i in g.members:
            out[i] = per_entry
    return out


#: The blocked formats' block shapes: (rows, columns) of the weight [out, in] one stored entry covers.
_BLOCKS = {"bcsr4x1": (4, 1), "bcsr1x4": (1, 4)}
#: Formats that read every weight value whatever the zeros.
_DENSE_READS = (DENSE, "dnnl")


class _Stored:
    """Millions of weight values a layer's kernel reads at an entry in a format: every value for
    the dense formats, every value of a non-empty block for the blocked ones, the nonzeros for the
    others (and for the N:M patterns' entries). The in-model per-weight term (``gamma``) charges
    these: a 4-wide block stores its zeros, so 40% unstructured sparsity in ``bcsr4x1`` still reads
    about 97% of the weight."""

    def __init__(self, layers: Sequence[_Layer], levels: Sequence[float], patterns: Sequence[str],
                 pruners: Sequence[LevelPruner] | None = None) -> None:
        self.kept = _kept(layers, levels, patterns)
        self._layers, self._levels = layers, [float(x) for x in levels]
        # the layers' pruners, when the caller has them (each holds its weight's order: 8 bytes a weight)
        self._pruners: dict[int, LevelPruner] = dict(enumerate(pruners)) if pruners is not None else {}
        self._blocks: dict[tuple[int, int, str], float] = {}

    def __call__(self, li: int, entry: int, fmt: str) -> float:
        spec, w, _b, _x = self._layers[li]
        if entry >= len(self._levels):
            return float(self.kept[li, entry])
        if fmt in _DENSE_READS:
            return w.size / 1e6
        kind = fmt.removesuffix(SERIAL_SUFFIX)
        if spec.kind != "linear" or kind not in _BLOCKS:
            return float(self.kept[li, entry])
        key = (li, entry, kind)
        if key not in self._blocks:
            pruner = self._pruners.get(li)
            if pruner is None:
                pruner = self._pruners[li] = LevelPruner(w)
            self._blocks[key] = stored_values(pruner.at(self._levels[entry]), kind) / 1e6
        return self._blocks[key]


def stored_values(w: np.ndarray, fmt: str) -> int:
    """Weight values a Linear weight ``w`` [out, in] stores in ``fmt``: the nonzeros, or for a
    blocked format every value of each block with a nonzero (a trailing partial block counts whole)."""
    nz = np.asarray(w).reshape(w.shape[0], -1) != 0
    if fmt not in _BLOCKS:
        return int(nz.sum())
    r, c = _BLOCKS[fmt]
    O, K = nz.shape
    pad = np.zeros((-(-O // r) * r, -(-K // c) * c), dtype=bool)
    pad[:O, :K] = nz
    blocks = pad.reshape(pad.shape[0] // r, r, pad.shape[1] // c, c).any(axis=(1, 3))
    return int(blocks.sum()) * r * c


def _kept(layers: Sequence[_Layer], levels: Sequence[float], patterns: Sequence[str]) -> np.ndarray:
    """``[layer, entry]`` millions of weights each entry keeps (grid levels, then N:M patterns)."""
    from spdy.choices import parse_pattern

    nm = [parse_pattern(p) for p in patterns]
    density = [1.0 - float(s) for s in levels] + [q.n / q.m for q in nm]
    return np.array([[d * w.size / 1e6 for d in density] for _s, w, _b, _x in layers])


def _serial(fmt: str) -> bool:
    return fmt.endswith(SERIAL_SUFFIX)


def _pick(cands: dict[str, _Cand], terms: InModelTerms | None, kept: float | Callable[[str], float] = 0.0,
          credit: float = 0.0) -> tuple[str, float, float]:
    """The fastest format of one entry (in-model time when ``terms`` is given): (format, seconds, spread).

    ``kept``: millions of weight values the entry's kernel reads, one number or per format
    (:class:`_Stored`).

    ``credit``: seconds a format of :data:`~spdy.types.FUSED_FORMATS` saves besides its own time
    (the whole saving of the fused groups it is in: a format that does not fuse forfeits it for the
    group); it counts in the choice, not in the seconds returned.

    The format is the fastest over all passes. Its time is cross-fitted: the format picked on the
    even passes timed by the odd ones, and the other way round, averaged. The fastest of a few
    noisy estimates is biased low (the pick favours the format whose passes happened to read
    low); a pick's time read from passes that did not make the pick is not.
    """
    if not cands:
        return NO_KERNEL, math.inf, math.nan

    def cost(f: str, t: float) -> float:
        return t if terms is None else terms.apply(t, f != DENSE, kept(f) if callable(kept) else kept, _serial(f))

    def fastest(which: Callable[[_Cand], float]) -> str:
        return min(cands, key=lambda f: format_rank(f, cost(f, which(cands[f])) - credit * (f in FUSED_FORMATS)))

    f = fastest(lambda c: c[0])
    if any(len(c) < 3 for c in cands.values()):
        return f, cost(f, cands[f][0]), cands[f][1]
    even, odd = fastest(lambda c: c[2][0]), fastest(lambda c: c[2][1])
    t = 0.5 * (cost(even, cands[even][2][1]) + cost(odd, cands[odd][2][0]))
    return f, t, cands[f][1]


def _dense_as_unpruned(entries: Sequence[dict[str, _Cand]]) -> list[dict[str, _Cand]]:
    """A layer's entries with each dense format (:data:`_DENSE_READS`) timed as at the unpruned
    entry: a dense kernel does the same work whatever its zeros, so a pruned level run dense is
    never faster than the unpruned one (its own timings differ only by noise, which would let the
    DP buy error for nothing)."""
    if not entries:
        return []
    first = entries[0]
    return [dict(first) if e == 0 else {f: (first[f] if f in _DENSE_READS and f in first else c) for f, c in c_e.items()}
            for e, c_e in enumerate(entries)]


def _table_arrays(cands: Sequence[Sequence[dict[str, _Cand]]], terms: InModelTerms | None,
                  stored: Callable[[int, int, str], float], credit: Sequence[float] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, ...]]]:
    """Per layer and entry of ``cands``: the picked format's in-model seconds, spread and the
    format; ``stored(layer, entry, format)`` the millions of weight values it reads (:class:`_Stored`)."""
    cr = np.zeros(len(cands)) if credit is None else np.asarray(credit, dtype=np.float64)
    cands = [_dense_as_unpruned(entries) for entries in cands]
    picked = [[_pick(c, terms, lambda f, li=li, e=e: stored(li, e, f), float(cr[li])) for e, c in enumerate(entries)]
              for li, entries in enumerate(cands)]
    times = np.array([[p[1] for p in row] for row in picked])
    spread = np.array([[p[2] for p in row] for row in picked])
    formats = [tuple(p[0] for p in row) for row in picked]
    return times, spread, formats


def _consistency(groups: Sequence[_Group], grid: SparsityGrid) -> dict[str, Any]:
    """Per group: members timed, passes, and how far the passes' ratios (each pass another member,
    another minute) and raw dense times were apart (max / min)."""
    out = {}
    for g in groups:
        per_level = []
        for e in range(1, len(grid)):
            best = g.best_format(e)
            rs = [r for r, _ in g.ratios[e][best]]
            per_level.append(max(rs) / max(min(rs), 1e-12))
        out[g.key] = {"layers": len(g.members), "passes": len(g.dense_pass_s),
                      "members_timed": min(len(g.members), len(g.dense_pass_s)),
                      "ratio_max_over_min": {"median": float(np.median(per_level)) if per_level else 1.0,
                                             "max": float(np.max(per_level)) if per_level else 1.0},
                      "dense_pass_max_over_min": float(max(g.dense_pass_s) / min(g.dense_pass_s))}
    return out


def profile_model(
    bundle: ModelBundle,
    backend: Backend,
    grid: SparsityGrid = DEFAULT_GRID,
    specs: Sequence[LayerSpec] | None = None,
    progress: Progress | None = None,
    patterns: Sequence[str] | str = (),
    fit_models: int = DEFAULT_FIT_MODELS,
    seed: int = 0,
) -> Profile:
    """Measure the latency table of ``bundle``'s prunable layers on ``backend``.

    1. Layers of one shape group (:func:`~spdy.profilers.in_model.group_key`) share one
       measurement when the backend allows it; every pass times one member of every group
       (another member each pass) at every level, interleaved with its dense kernel, and
       keeps the *ratios*. Passes run round-robin over the groups.
    2. Between passes, ``fit_models`` random pruned models in all
       (:func:`~spdy.profilers.in_model.spanning_level_vectors`) are timed end to end, each
       round interleaved with the unpruned model: the in-model terms are fitted on them
       (:mod:`spdy.profilers.in_model`; 0 = off, the table then holds loop times).
    3. One long interleaved measurement of each group's dense layer, the base model (every
       prunable layer a stand-in), the dense model and two uniformly pruned ones turns the
       ratios into seconds; the models' times are equations of the in-model fit.

    ``patterns`` (``"2:4"``, ...) also times each layer with its weight pruned to that N:M
    pattern (:meth:`Backend.pattern_formats`) and records it in ``pattern_times``.

    Everything is timed on the model's inference form (:attr:`ModelBundle.inference`: the
    BatchNorms that follow a layer folded into it, ``settings["batchnorm_folded"]``), so the
    base holds no BatchNorm a deployment would not run.
    """
    from spdy.choices import parse_patterns

    patterns = parse_patterns(patterns)
    folds = bundle.batchnorm_folds
    specs = bundle.inference_layers(specs)
    bundle = bundle.inference  # the model as it is deployed: BatchNorms folded (ModelBundle.inference)
    t_start = time.perf_counter()
    layers = _capture_layers(bundle, specs)
    groups = _measurement_groups(backend, specs)
    passes = _n_passes(backend, groups)
    total = passes * len(groups) + 2
    fit = _FitRounds(backend, bundle, layers, groups, grid.levels, fit_models, passes, seed)
    _time_groups(backend, layers, groups, grid.levels, patterns, progress, total, after_pass=fit.round)
    fit.round(passes)
    probes = _probes(backend, groups, specs, grid.levels)
    dense_layer, base, anchored, probed = _anchor(backend, bundle, layers, groups, grid.levels, fit.pruners,
                                                  _probe_plans(layers, grid.levels, probes, fit.pruners))
    dense = anchored[0][1]
    pairs = backend.fused_pairs(bundle, specs)
    saving, fusion = _fusion_saving(backend, bundle, layers, groups, grid.levels, fit.pruners, pairs)
    triples = backend.fused_triples(bundle, specs)
    t_saving, t_fusion = _fusion_saving(backend, bundle, layers, groups, grid.levels, fit.pruners, triples,
                                        backend.triple_fusion_runners, "triples")
    singles = backend.fused_singles(bundle, specs)
    s_saving, s_fusion = _fusion_saving(backend, bundle, layers, groups, grid.levels, fit.pruners, singles,
                                        backend.single_fusion_runners, "epilogues")
    planned = backend.planned_layers(bundle, specs)
    p_saving, p_fusion = _fusion_saving(backend, bundle, layers, groups, grid.levels, fit.pruners, planned,
                                        backend.plan_runners, "planned layers")
    plans: tuple[PlannedLayer, ...] = ()
    if p_saving > 0 and pairs and triples and singles and saving > 0:
        # a planned layer's saving comes only with all its parts fused: a third of it is credited to
        # each of its fused groups (each layer holds one group of each kind) for the DP, and taken
        # back where the six projections do not all fuse (PlannedLayer)
        share = p_saving / 3
        saving, t_saving, s_saving = saving + share, t_saving + share, s_saving + share
        p_fusion["share_per_group_s"] = share
        plans = tuple(PlannedLayer(g, share) for g in planned)  # type: ignore[arg-type]
    calls = [(triples, t_saving), (singles, s_saving)]
    if progress:
        progress(total - 1, total, "base and dense model")
    S = len(grid)
    factors, probe_records = _format_factors(probes, probed, base.median_s,
                                             _candidate_times(groups, dense_layer, len(specs)), S)
    cands = _scaled(_candidate_times(groups, dense_layer, len(specs)), factors, S)
    if factors:
        log.info("in-model factors (among layers at %.2f, themselves %.2f): %s", float(grid.levels[probes[0].entry]),
                 probe_records[0]["factor"], "; ".join(f"{r['format']} at {float(grid.levels[r['entry']]):.2f}: "
                                                       f"{r['factor']:.2f}" for r in probe_records[1:]))
    stored = _Stored(layers, grid.levels, patterns, fit.pruners)
    terms = fit.terms(cands, base.median_s, stored,
                      [(e, _anchor_formats(groups, len(specs), e), t.median_s) for e, t in anchored], pairs, saving,
                      calls, plans)
    # when formats are picked, a format that fuses is worth the whole group's saving: one layer in a
    # format that does not forfeits the saving of the group (the table's times carry each layer's share)
    # (without the planned layers' shares: those come only with every projection of a layer fused,
    # which one layer's format does not decide)
    share = plans[0].share_s if plans else 0.0
    credit = np.zeros(len(specs))
    for i, j in pairs:
        credit[[i, j]] = saving - share
    for members, each in calls:
        for g in members:
            credit[list(g)] += each - share
    times, spread, formats = _table_arrays([c[:S] for c in cands], terms, stored, credit)
    for members, each in calls:
        _credit_groups(times, formats, members, each)
    settings: dict[str, Any] = {
        **backend.settings(), **model_settings(bundle, specs), "latency_model_version": LATENCY_MODEL_VERSION,
        "base_spread": base.spread, "dense_measured_s": dense.median_s,
        "anchor_models": [{"sparsity": float(grid.levels[e]), "measured_s": t.median_s} for e, t in anchored],
        "measurement": {"shared_by_shape": backend.shares_layer_measurements(), "passes": passes,
                        "groups": _consistency(groups, grid)},
        "in_model": terms.to_json(), "format_probes": probe_records, "fused_pairs": fusion, "fused_triples": t_fusion, "fused_epilogues": s_fusion,
        "planned_layers": p_fusion, "profile_seconds": round(time.perf_counter() - t_start, 1),
        "batchnorm_folded": [p.to_json() for p in folds],
        "samples": dict(backend.stats),
    }
    if progress:
        progress(total, total, "in-model terms")
    table = LatencyTable(tuple(s.name for s in specs), grid, times, base.median_s, backend.fingerprint(),
                         formats=tuple(formats), fused=tuple(FusedPair(i, j, saving) for i, j in pairs if saving > 0),
                         planned=plans)
    log.info("base %.2f ms; dense model measured %.2f ms, predicted %.2f ms (%+.1f%%)", base.median_s * 1e3,
             dense.median_s * 1e3, table.dense_total_s * 1e3, (table.dense_total_s / dense.median_s - 1) * 100)
    return Profile(table=table, backend=backend.name, model=bundle.name, specs=tuple(specs), settings=settings,
                   spread=spread, formats=tuple(formats),
                   **_pattern_fields(patterns, [c[S:] for c in cands], terms, backend, bundle,
                                     lambda li, e, f: stored(li, S + e, f)))


def _credit_groups(times: np.ndarray, formats: Sequence[Sequence[str]], groups: Sequence[tuple[int, ...]],
                   saving: float) -> None:
    """Take an equal share of a group's measured ``saving`` (a third of a query-key-value triple's,
    all of a one-layer epilogue's) off each of its layers' times, in place, at every level whose
    format fuses. The runtime saves it when all the group's layers run such a format; the DP adds
    layers up one by one, so this is exact where their formats all fuse (on MiniLM every level's
    format did) and credits a layer beside a non-fusing one a share it does not save."""
    if saving <= 0:
        return
    for g in groups:
        for i in g:
            for e, f in enumerate(formats[i]):
                if f in FUSED_FORMATS:
                    times[i, e] = max(times[i, e] - saving / len(g), 0.0)


class _FitRounds:
    """The end-to-end measurements the in-model terms are fitted on, spread over the profiling run.

    The random models' kernel formats are the fastest per level after the first pass; each
    round (after a pass) times a share of the models interleaved with the unpruned model.
    """

    def __init__(self, backend: Backend, bundle: ModelBundle, layers: Sequence[_Layer], groups: Sequence[_Group],
                 levels: Sequence[float], k: int, passes: int, seed: int) -> None:
        self.backend, self.bundle, self.layers, self.groups, self.levels = backend, bundle, layers, groups, levels
        self.pruners = [LevelPruner(w) for _s, w, _b, _x in layers]
        self.vectors = spanning_level_vectors(len(layers), len(levels), k, seed + FIT_SEED_OFFSET) if k > 0 else None
        self.chunks = np.array_split(np.arange(k), max(1, passes - 1)) if k > 0 else []
        self.formats: list[list[str]] = []  # [layer][level], fixed at the first round
        self.ratios: dict[int, list[float]] = {}

    def round(self, p: int) -> None:
        if self.vectors is None or p - 1 >= len(self.chunks):
            return
        if not self.formats:
            self.formats = [[] for _ in self.layers]
            for g in self.groups:
                per_level = [g.best_format(e) for e in range(len(self.levels))]
                for i in g.members:
                    self.formats[i] = per_level
        idx = self.chunks[p - 1]
        if not len(idx) or not any(f != DENSE for row in self.formats for f in row):
            return
        plans = [self._plan(np.zeros(len(self.layers), dtype=np.int64))] + [self._plan(self.vectors[i]) for i in idx]
        timings = self.backend.time_models(self.bundle, plans)
        for i, t in zip(idx, timings[1:]):
            self.ratios.setdefault(int(i), []).append(t.median_s / timings[0].median_s)

    def _plan(self, levels: np.ndarray) -> dict[str, LayerChoice]:
        plan = {}
        for li, (spec, w, b, _x) in enumerate(self.layers):
            s = float(self.levels[int(levels[li])])
            plan[spec.name] = LayerChoice(self.formats[li][int(levels[li])], self.pruners[li].at(s), b, s)
        return plan

    def terms(self, cands: Sequence[Sequence[dict[str, _Cand]]], base_s: float, stored: Callable[[int, int, str], float],
              anchors: Sequence[tuple[int, Sequence[str], float]], pairs: Sequence[tuple[int, int]] = (),
              saving: float = 0.0, calls: Sequence[tuple[Sequence[tuple[int, ...]], float]] = (),
              planned: Sequence[PlannedLayer] = ()) -> InModelTerms:
        """Fit the terms on the rounds' ratios, with the layers' final loop times; ``anchors`` =
        [(grid level, the formats, measured seconds)] of the models timed with the base; ``pairs``
        the fused pairs, each saving ``saving`` seconds where both layers run a format that fuses;
        ``calls`` = [(groups, saving)]: groups of layers the runtime runs as one call (query-key-value
        triples, one-layer epilogues), each saving that many seconds where all its layers run a
        format that fuses; ``planned`` the planned layers, whose credits in those savings come back
        where their layers do not all fuse."""
        if not self.ratios or self.vectors is None:
            return InModelTerms()

        def feats(levels: np.ndarray, fm: Sequence[str]) -> np.ndarray:
            t = [cands[li][int(lv)][f][0] for li, (lv, f) in enumerate(zip(levels, fm))]
            F = model_features(t, [f != DENSE for f in fm], [stored(li, int(lv), f) for li, (lv, f) in enumerate(zip(levels, fm))],
                               [_serial(f) for f in fm])
            # the first feature's coefficient is fixed at 1: the fused pairs' measured saving comes off it
            F[0] -= saving * sum(fm[i] in FUSED_FORMATS and fm[j] in FUSED_FORMATS for i, j in pairs)
            for members, each in calls:
                F[0] -= each * sum(all(fm[i] in FUSED_FORMATS for i in g) for g in members)
            # a planned layer's shares came off with its groups above (a triple's only where all three
            # fuse); where its six projections do not all fuse, they come back
            F[0] += sum(g.taken_back([fm[i] in FUSED_FORMATS for i in g.members], whole_triple=True) for g in planned)
            return F

        def at(levels: np.ndarray) -> np.ndarray:
            return feats(levels, [self.formats[li][int(lv)] for li, lv in enumerate(levels)])

        keys = sorted(self.ratios)
        zeros = np.zeros(len(self.layers), dtype=np.int64)
        F = np.array([at(self.vectors[i]) for i in keys])
        ratio = np.array([float(np.median(self.ratios[i])) for i in keys])
        terms = fit_terms(F, at(zeros), base_s, ratio,
                          [(feats(np.full(len(self.layers), e), fm), t) for e, fm, t in anchors])
        pick = spanning_probes(ratio, STATE_PROBES)
        return replace(terms, fit={**terms.fit, "probes": self.probes([keys[i] for i in pick], ratio[pick])})

    def probes(self, keys: Sequence[int], ratios: np.ndarray) -> dict[str, Any]:
        """Some of the fit's models as they were timed (levels, formats, the reference's formats and
        their ratios): :func:`validate` times them again to see how far the machine's state moved."""
        return {"levels": [self.vectors[i].tolist() for i in keys],
                "formats": [[self.formats[li][int(lv)] for li, lv in enumerate(self.vectors[i])] for i in keys],
                "reference_formats": [row[0] for row in self.formats], "ratios": [float(r) for r in ratios]}


def _pattern_fields(patterns: Sequence[str], cands: Sequence[Sequence[dict[str, _Cand]]],
                    terms: InModelTerms, backend: Backend, bundle: ModelBundle,
                    stored: Callable[[int, int, str], float]) -> dict[str, Any]:
    if not patterns:
        return {}
    times, spread, formats = _table_arrays(cands, terms, stored)
    out = {"patterns": tuple(patterns), "pattern_times": times, "pattern_spread": spread,
           "pattern_formats": tuple(formats)}
    for k, p in enumerate(patterns):
        n_kernel = int(np.isfinite(out["pattern_times"][:, k]).sum())
        if n_kernel == 0:
            log.warning("%s has no %s kernel for any layer of %s; the pattern is not a choice here",
                        backend.name, p, bundle.name)
        else:
            log.info("%s: %d of %d layers have a %s kernel", backend.name, n_kernel, len(cands), p)
    return out


def _interleaved_ratios(backend: Backend, bundle: ModelBundle, profile: Profile, vectors: np.ndarray,
                        runtimes: DenseRuntimes | None = None, extra: Sequence[Mapping[str, LayerChoice]] = ()
                        ) -> tuple[np.ndarray, Timing, list[Timing], dict[str, Timing], list[Timing]]:
    """Each level vector's model timed end to end, interleaved with the dense model (first), the
    ``extra`` plans and the base model (last), and the dense ``runtimes`` in the same round
    (:func:`~spdy.profilers.dense_runtimes.time_with_runtimes`): (pruned / dense time ratios,
    the dense timing, the pruned models' timings then the base's, ``{runtime: dense timing}``,
    the extra plans' timings)."""
    plans = level_plans(profile, bundle, np.zeros((1, len(profile.table.layers)), dtype=np.int64))
    plans += level_plans(profile, bundle, vectors)
    plans += list(extra)
    plans.append({n: LayerChoice(STANDIN) for n in profile.table.layers})
    (timings,), (by_runtime,) = time_with_runtimes(backend, bundle, plans, runtimes, rounds=1)
    dense = timings[0]
    pruned = timings[1:1 + len(vectors)]
    return (np.array([t.median_s / dense.median_s for t in pruned]), dense, pruned + [timings[-1]], by_runtime,
            timings[1 + len(vectors):-1])


def spanning_probes(ratios: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` of the fit's models whose measured ratios to the unpruned model span the
    range, the sparsest and the densest included: a drift in what very sparse models pay per
    call shows in the sparsest probe, which the middle ones barely feel."""
    order = np.argsort(np.asarray(ratios, dtype=np.float64), kind="stable")
    if len(order) <= k:
        return order
    return order[np.unique(np.rint(np.linspace(0, len(order) - 1, k)).astype(np.int64))]


def probe_shifts(probe_s: Sequence[float], then: np.ndarray) -> np.ndarray:
    """Each state probe's time ratio to its reference now over the ratio it had in the profile
    (``probe_s``: the reference's seconds first, then the probes', all timed in one round)."""
    return np.asarray(probe_s[1:], dtype=np.float64) / probe_s[0] / then


def state_probe_plans(profile: Profile, bundle: ModelBundle) -> tuple[list[dict[str, LayerChoice]], np.ndarray]:
    """The profile's state probes (:data:`STATE_PROBES` of the fit's models, as they were timed):
    plans (their reference first) and the ratios they measured then; none for older profiles."""
    probes = profile.settings.get("in_model", {}).get("fit", {}).get("probes")
    if not probes or not probes.get("levels"):
        return [], np.array([])
    names = profile.table.layers
    grid = profile.table.grid.levels
    bundle = bundle.inference
    weights = {n: _weight_bias(bundle, n) for n in names}
    pruners = {n: LevelPruner(w) for n, (w, _b) in weights.items()}

    def plan(levels: Sequence[int], formats: Sequence[str]) -> dict[str, LayerChoice]:
        out = {}
        for n, lv, fmt in zip(names, levels, formats):
            s = float(grid[int(lv)])
            out[n] = LayerChoice(fmt, pruners[n].at(s), weights[n][1], s)
        return out

    plans = [plan([0] * len(names), probes["reference_formats"])]
    plans += [plan(lv, fm) for lv, fm in zip(probes["levels"], probes["formats"])]
    return plans, np.asarray(probes["ratios"], dtype=np.float64)


def level_plans(profile: Profile, bundle: ModelBundle, level_vectors: np.ndarray) -> list[dict[str, LayerChoice]]:
    """For each level vector, every layer magnitude-pruned to its level in the profile's format for it."""
    if profile.formats is None:
        raise InvalidInputError("the profile records no kernel format per level; re-run 'spdy profile' to get one")
    pruners: dict[str, LevelPruner] = {}
    bundle = bundle.inference

    def weight(name: str, choice: Choice) -> np.ndarray:
        if name not in pruners:
            pruners[name] = LevelPruner(_weight_bias(bundle, name)[0])
        return pruners[name].at(choice.sparsity)

    return [backend_plan(profile.table.solution(lv), weight, bundle.model) for lv in level_vectors]


#: How many random models, next to the dense model, read the machine's state in a validation round.
STATE_ANCHORS = 4
#: Added to a validation's seed to draw them (:func:`state_anchor_vectors`), apart from the validated
#: models and from the fit's.
STATE_SEED_OFFSET = 7919


def state_anchor_vectors(table: LatencyTable, seed: int = 0) -> np.ndarray:
    """Level vectors of the models whose times, next to the dense model's, read the machine's state
    in a validation round (:func:`read_state`): :data:`STATE_ANCHORS` random models drawn as the
    validated ones are (:func:`~spdy.profilers.in_model.spanning_level_vectors`: some layers kept
    dense, the others pruned around a level anywhere on the grid, as searched profiles look), but
    with their own seed, so that none of them is a model whose prediction is being checked."""
    return spanning_level_vectors(len(table.layers), len(table.grid), STATE_ANCHORS, seed + STATE_SEED_OFFSET)


def read_state(predicted_s: Sequence[float], measured_s: Sequence[float]) -> tuple[float, float]:
    """The machine's state as two numbers, ``(scale, offset_s)``: the least-squares line
    ``measured = scale * predicted + offset_s`` through models timed in one round (the dense model
    and :func:`state_anchor_vectors`' random ones). A scale alone would say that the machine sped
    every model up alike; the offset, a time per forward pass whatever the model's sparsity, is
    what lets a sparse model's share of the dense model's time move too."""
    x = np.asarray(predicted_s, dtype=np.float64)
    y = np.asarray(measured_s, dtype=np.float64)
    if x.shape != y.shape or len(x) < 2 or np.ptp(x) <= 0:
        raise InvalidInputError(f"reading the state needs at least two models of different predicted times; got {x}")
    scale, offset = np.linalg.lstsq(np.c_[x, np.ones_like(x)], y, rcond=None)[0]
    return float(scale), float(offset)


def state_shift(probe_s: Sequence[float], then: np.ndarray) -> float:
    """How far the machine's state moved since the profile: the median over the state probes of
    :func:`probe_shifts` (their time ratio to their reference now over the ratio they had in the
    profile, ``then``)."""
    return float(np.median(probe_shifts(probe_s, then)))


def validate(
    profile: Profile,
    bundle: ModelBundle,
    backend: Backend,
    k: int = 5,
    seed: int = 0,
    progress: Progress | None = None,
    runtimes: DenseRuntimes | None = None,
) -> list[dict[str, float]]:
    """Time ``k`` random pruned models end to end and compare with the profile's predictions.

    Level vectors span the grid (:func:`~spdy.profilers.in_model.spanning_level_vectors`,
    drawn apart from the models the in-model terms were fitted on). Each pruned model uses,
    per layer, the format the profile chose for that level; the ``k`` models, the dense
    model and the base model (all stand-ins) are timed interleaved, and the dense model in each of
    ``runtimes`` (torch eager, ONNX Runtime; :func:`~spdy.profilers.dense_runtimes.dense_runtimes`
    of the inference form) in the same round. Each record holds the
    absolute times and ``error``: the predicted over the measured time minus 1, both as
    fractions of the dense model's time (predicted by the profile, measured in the same
    rounds), so that a machine that runs faster or slower than when it was profiled does
    not count as an error of the latency model. ``base_measured_s`` over the profile's
    base shows that drift. Returns ``[{"predicted_s", "measured_s", "predicted_speedup",
    "measured_speedup", "error", "spread", "dense_measured_s", "base_measured_s"}]``, with
    ``"<runtime>_dense_s"`` and ``"speedup_over_<runtime>"`` (the pruned model's speedup over
    the dense model in that runtime) for each of ``runtimes``.

    The same round times again some of the models the in-model terms were fitted on, exactly as
    the profile timed them (:data:`STATE_PROBES`, with their reference). ``state_shift`` is the
    median of their time ratio to the reference now over then: below 1, pruned models run
    relatively faster than while the profile was measured; the machine's state moved (a neighbour's
    load, memory bandwidth), not the model. ``error_same_state`` is ``error`` with that taken out,
    ``(1 + error) * state_shift - 1``: the latency model's own error. The probes span the fit's
    models from the sparsest to the densest (:func:`spanning_probes`); ``probe_shifts`` records
    each one's shift, and ``probe_ratios`` the ratio it had in the profile, since a drift can differ
    along that range (all absent for a profile without probes: no sparse kernel won, or an older
    profile).

    The probes' ratio then comes from another minute, and the machine's moves do not scale every
    model alike: on these 2-core machines sparse models sped up by up to twice the dense model's
    share from one minute to the next. So the same round also times the random models of
    :func:`state_anchor_vectors`, and :func:`read_state` reads a line off them and the dense model:
    ``state_scale`` and ``state_offset_s``. ``predicted_state_s`` is ``state_scale * predicted_s
    + state_offset_s``, the table's prediction in the machine's state of that round, and
    ``error_state`` its error against ``measured_s``: how well the table's layer times rank and add
    up, the machine's move taken out (the random models are not among the models the state is read
    from).
    """
    if profile.backend != backend.name:
        raise InvalidInputError(
            f"the profile was made with backend {profile.backend!r}; validate it with that backend, not {backend.name!r}"
        )
    if k < 1:
        return []
    bundle = bundle.inference  # timed as the profile was: BatchNorms folded
    profile.check_model(bundle.layers())
    t = profile.table
    vectors = spanning_level_vectors(len(t.layers), len(t.grid), k, seed)
    probes, then = state_probe_plans(profile, bundle)
    anchors = state_anchor_vectors(t, seed)
    ratios, dense, timings, by_runtime, extra = _interleaved_ratios(
        backend, bundle, profile, vectors, runtimes, probes + level_plans(profile, bundle, anchors))
    probed, anchored = extra[:len(probes)], extra[len(probes):]
    state = None
    anchor_pred = [t.dense_total_s] + [t.predicted_time(v) for v in anchors]
    if np.ptp(anchor_pred) > 0:  # no pruned model faster than the dense one: no state to read
        state = read_state(anchor_pred, [dense.median_s] + [a.median_s for a in anchored])
    base_now = timings[-1]
    drift = base_now.median_s / t.base_s - 1 if t.base_s > 0 else float("nan")
    probe_s = [p.median_s for p in probed]
    shifts = probe_shifts(probe_s, then) if len(then) else np.array([])
    shift = float(np.median(shifts)) if len(then) else float("nan")  # state_shift, from the shifts at hand
    records = []
    for lv, ratio, tm in zip(vectors, ratios, timings):
        pred = t.predicted_time(lv)
        error = float((pred / t.dense_total_s) / ratio - 1)
        rec = {"predicted_s": pred, "measured_s": tm.median_s, "predicted_speedup": t.dense_total_s / pred,
               "measured_speedup": float(1.0 / ratio), "error": error,
               "spread": tm.spread, "dense_measured_s": dense.median_s, "base_measured_s": base_now.median_s}
        if state is not None:
            rec.update(state_scale=state[0], state_offset_s=state[1], predicted_state_s=state[0] * pred + state[1],
                       error_state=(state[0] * pred + state[1]) / tm.median_s - 1)
        if len(then):
            rec.update(state_shift=shift, probe_shifts=shifts.tolist(), probe_ratios=then.tolist(),
                       error_same_state=(1 + error) * shift - 1)
        for rt, rt_t in by_runtime.items():
            rec[f"{rt}_dense_s"] = rt_t.median_s
            rec[f"speedup_over_{rt}"] = rt_t.median_s / tm.median_s
        records.append(rec)
        log.info("random profile: predicted %.2fx, measured %.2fx (time %+.1f%%)", rec["predicted_speedup"],
                 rec["measured_speedup"], rec["error"] * 100)
    if state is not None:
        log.info("the machine's state, read from the dense model and %d random ones: time = %.3f x the table's "
                 "%+.2f ms", len(anchors), state[0], state[1] * 1e3)
    if len(then):
        log.info("the profile's %d state probes now run at %.3f of the time relative to the unpruned model that "
                 "they ran at in the profile", len(then), shift)
    log.info("base time now %.2f ms, in the profile %.2f ms (%+.1f%%)", base_now.median_s * 1e3, t.base_s * 1e3,
             drift * 100)
    if abs(drift) > 0.1:
        log.warning("the base model runs %+.0f%% %s than when the profile was measured: the machine's speed "
                    "changed (other load, frequency); absolute times are off by about as much, speedups are not",
                    drift * 100, "slower" if drift > 0 else "faster")
    if progress:
        progress(k, k, "validation")
    return records


def _errors(records: Sequence[dict[str, float]]) -> list[float]:
    # records of older profiles hold absolute times only
    return [r["error"] if "error" in r else r["predicted_s"] / r["measured_s"] - 1 for r in records]


def validation_error(records: Sequence[dict[str, float]]) -> float:
    """Median of ``|predicted - measured| / measured`` over the records (nan if none); times as
    fractions of the dense model's time measured with them, see :func:`validate`."""
    if not records:
        return float("nan")
    return float(np.median(np.abs(_errors(records))))


def state_validation_errors(records: Sequence[dict[str, float]]) -> tuple[float, float]:
    """Median ``|error_state|`` and median ``error_state`` (see :func:`validate`): the table's
    error once the machine's state is read in the same round; nan for records without it."""
    errs = [r["error_state"] for r in records if "error_state" in r]
    if not errs:
        return float("nan"), float("nan")
    return float(np.median(np.abs(errs))), float(np.median(errs))


def signed_validation_error(records: Sequence[dict[str, float]]) -> float:
    """Median of ``predicted / measured - 1`` time (as fractions of the dense model's) over the
    records: negative means the models ran slower than predicted (nan if none)."""
    if not records:
        return float("nan")
    return float(np.median(_errors(records)))

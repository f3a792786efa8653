"""In-model terms: how a layer's time inside the model differs from its time alone.

The profiler times each layer alone, in a loop, where its weights and input stay in
the caches and its thread team stays awake, and the base with every prunable layer a
stand-in that returns a stored output. Inside a forward pass both change. Measured side
by side, a layer costs inside the model what it costs alone; the *rest* of the pass
(attention, normalisation, residuals) does not cost the stand-in base: the layers'
weights stream through the caches and evict its activations, and on two threads a
kernel that ran on the calling thread alone leaves the other thread asleep for the
next torch operator to wake. So the unpruned model runs slower than the base plus its
layers, and a pruned one less so.

The profile learns this from end-to-end measurements. A layer that took ``t`` in the
loop costs ``t`` (dense format) or ``alpha * t + beta`` (sparse format), plus ``call``
per layer call, ``gamma`` per million weights it keeps, and ``delta`` if its kernel runs
on the calling thread alone. Every term is per layer, so the table stays additive and
the DP can use it. The terms are fitted by robust least squares on random pruned models
timed end to end, each interleaved with the unpruned model, so that only the ratio
``pruned / unpruned`` of one window enters the fit, plus absolute equations: the
unpruned model and two uniformly pruned ones, timed in the same long window as the base
and the dense layers (:func:`fit_terms`). The profiler spreads the random models over the whole profiling
run, as it does the layer timings, so that the terms describe the machine's usual state
rather than one minute of it. Three forms compete (the sparse kernels' ``alpha, beta``;
the rest's ``call, gamma, delta``; all five) on how well they predict the models they
were not fitted on, and loop times stay if none predicts them better. The fit is checked
on other random models by :func:`spdy.profilers.validate`.

Layers of one shape group (:func:`group_key`) run the same kernel work, and the
profiler times them in turns (:func:`layer_groups`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spdy.errors import InvalidInputError
from spdy.types import LayerSpec

log = logging.getLogger(__name__)

#: Bounds of the fitted scale of sparse-kernel time inside the model.
ALPHA_BOUNDS = (0.5, 3.0)


def group_key(spec: LayerSpec) -> str:
    """Layers with the same key run the same kernel work: kind, weight and input shape, bias, conv geometry."""
    key = f"{spec.kind} w{'x'.join(map(str, spec.weight_shape))} in{'x'.join(map(str, spec.input_shape))}"
    if not spec.has_bias:
        key += " nobias"
    if spec.kind == "conv2d":
        key += f" s{spec.stride[0]}x{spec.stride[1]} p{spec.padding[0]}x{spec.padding[1]} d{spec.dilation[0]}x{spec.dilation[1]}"
    return key


def layer_groups(specs: Sequence[LayerSpec]) -> tuple[list[str], np.ndarray]:
    """The distinct :func:`group_key` values (in order of first appearance) and each layer's group index."""
    keys: list[str] = []
    index = np.empty(len(specs), dtype=np.int64)
    for i, s in enumerate(specs):
        k = group_key(s)
        if k not in keys:
            keys.append(k)
        index[i] = keys.index(k)
    return keys, index


def spanning_level_vectors(n_layers: int, n_levels: int, k: int, seed: int = 0) -> np.ndarray:
    """``k`` random level vectors whose overall sparsity spans the grid (shape ``[k, n_layers]``).

    Per vector: a centre level uniform over the grid, per-layer levels scattered around it,
    and in half of the vectors a random share (up to 40%) of the layers left dense, which
    is how searched profiles look (some layers kept, the others pruned hard). Uniform
    draws per layer instead all land near the same mid-range speedup.
    """
    if k < 0 or n_layers < 1 or n_levels < 2:
        raise InvalidInputError(f"need k >= 0, n_layers >= 1, n_levels >= 2; got {k}, {n_layers}, {n_levels}")
    rng = np.random.default_rng(seed)
    out = np.empty((k, n_layers), dtype=np.int64)
    top = n_levels - 1
    for i in range(k):
        centre = rng.uniform(1, top)
        lv = np.rint(centre + rng.normal(0.0, 0.15 * top, n_layers))
        lv = np.clip(lv, 1, top).astype(np.int64)
        if rng.random() < 0.5:
            lv[rng.random(n_layers) < rng.uniform(0.0, 0.4)] = 0
        out[i] = lv
    return out


@dataclass(frozen=True)
class InModelTerms:
    """What a layer costs inside the model beyond its loop time (see the module docstring).

    A layer that took ``t`` seconds alone costs ``t`` (dense format) or ``alpha * t + beta``
    (sparse format) plus ``call`` (every layer call), ``gamma`` per million weights it keeps
    and ``delta`` if its kernel runs on the calling thread alone.
    """

    alpha: float = 1.0
    beta: float = 0.0  # seconds per sparse layer call
    fit: dict[str, Any] = field(default_factory=lambda: {"fitted": False})
    call: float = 0.0  # seconds per layer call, any format
    gamma: float = 0.0  # seconds per million kept weights
    delta: float = 0.0  # seconds per serial-kernel call

    def __post_init__(self) -> None:
        vals = (self.alpha, self.beta, self.call, self.gamma, self.delta)
        if not all(math.isfinite(v) for v in vals) or self.alpha <= 0:
            raise InvalidInputError(f"in-model terms need a finite alpha > 0 and finite other terms; got {vals}")

    def apply(self, t_alone: float, sparse: bool = True, kept_mweights: float = 0.0, serial: bool = False) -> float:
        """In-model seconds of a layer that took ``t_alone`` in the loop.

        A sparse layer's share is never below ``ALPHA_BOUNDS[0] * t_alone``: a negative ``beta``
        (call overhead the loop pays and the model does not) must not make a short call free;
        nor is the total below that.
        """
        t = max(ALPHA_BOUNDS[0] * t_alone, self.alpha * t_alone + self.beta) if sparse else t_alone
        t += self.call + self.gamma * kept_mweights + (self.delta if serial else 0.0)
        return max(ALPHA_BOUNDS[0] * t_alone, t)

    def to_json(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta_s": self.beta, "call_s": self.call, "gamma_s_per_mweight": self.gamma,
                "delta_s": self.delta, "fit": self.fit}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "InModelTerms":
        return cls(float(d["alpha"]), float(d["beta_s"]), dict(d.get("fit", {})), float(d.get("call_s", 0.0)),
                   float(d.get("gamma_s_per_mweight", 0.0)), float(d.get("delta_s", 0.0)))


def model_features(alone: Sequence[float], sparse: Sequence[bool], kept_mweights: Sequence[float] | None = None,
                   serial: Sequence[bool] | None = None) -> np.ndarray:
    """``[dense-format loop s, sparse-format loop s, sparse calls, layer calls, kept Mweights, serial calls]``."""
    t = np.asarray(alone, dtype=np.float64)
    on = np.asarray(sparse, dtype=bool)
    kept = np.zeros(len(t)) if kept_mweights is None else np.asarray(kept_mweights, dtype=np.float64)
    ser = np.zeros(len(t), dtype=bool) if serial is None else np.asarray(serial, dtype=bool)
    return np.array([t[~on].sum(), t[on].sum(), float(on.sum()), float(len(t)), kept.sum(), float(ser.sum())])


#: Lower bound of the fitted per-call terms: a layer's loop time may include a little more per
#: call than the model pays (call overhead), never milliseconds.
BETA_MIN_S = -20e-6
#: The fitted parameters: (name, unit the solver works in, lower bound, upper bound, identity value).
_PARAMS = (("alpha", 1.0, ALPHA_BOUNDS[0], ALPHA_BOUNDS[1], 1.0),
           ("beta", 1e-5, BETA_MIN_S, np.inf, 0.0),
           ("call", 1e-5, BETA_MIN_S, np.inf, 0.0),
           ("gamma", 1e-3, 0.0, np.inf, 0.0),
           ("delta", 1e-5, BETA_MIN_S, np.inf, 0.0))
#: The second starting point of the fit: every term at a plausible size.
_START = {"alpha": 1.0, "beta": 1e-5, "call": 1e-5, "gamma": 1e-4, "delta": 1e-5}
#: The forms the fit chooses between, by how well each predicts models it was not fitted on:
#: loop times; the sparse kernels' own terms; the rest of the pass (per call, per kept weight, per
#: serial call); both.
FORMS: dict[str, tuple[str, ...]] = {"sparse-call": ("alpha", "beta"), "rest": ("call", "gamma", "delta"),
                                     "both": ("alpha", "beta", "call", "gamma", "delta")}
#: Weight of an anchor's row (a model timed with the base and the layers in one long window)
#: against one random model's.
ANCHOR_WEIGHT = 3.0


def _coefficients(p: dict[str, float]) -> np.ndarray:
    """The features' coefficients: ``time = base + F @ coefficients``."""
    return np.array([1.0, p["alpha"], p["beta"], p["call"], p["gamma"], p["delta"]])


def _identity() -> dict[str, float]:
    return {name: ident for name, _u, _lo, _hi, ident in _PARAMS}


def _least_squares(F: np.ndarray, ref: np.ndarray, base_s: float, ratio: np.ndarray,
                   anchors: Sequence[tuple[np.ndarray, float]], names: Sequence[str]) -> dict[str, float]:
    from scipy.optimize import least_squares

    spec = [row for row in _PARAMS if row[0] in names]
    unit = np.array([u for _n, u, _lo, _hi, _i in spec])

    def params(x: np.ndarray) -> dict[str, float]:
        p = _identity()
        p.update({n: float(v) for (n, *_), v in zip(spec, x * unit)})
        return p

    def f(x: np.ndarray) -> np.ndarray:
        c = _coefficients(params(x))
        t, t_ref = base_s + F @ c, base_s + ref @ c
        res = (t - ratio * t_ref) / t_ref
        if len(anchors):
            res = np.append(res, [ANCHOR_WEIGHT * ((base_s + a @ c) / t - 1) for a, t in anchors])
        return res

    lo = np.array([lo for _n, _u, lo, _hi, _i in spec]) / unit
    hi = np.array([hi for _n, _u, _lo, hi, _i in spec]) / unit
    # the identity sits on gamma's bound, where the solver does not leave it: start inside the
    # bounds, from the identity and from a point with every term at work, and keep the better fit
    starts = [np.array([i for _n, _u, _lo, _hi, i in spec]) / unit, np.array([_START[n] for n, *_ in spec]) / unit]
    fits = [least_squares(f, np.clip(x0, lo + 1e-3, hi - 1e-3), bounds=(lo, hi), loss="soft_l1", f_scale=0.01)
            for x0 in starts]
    return params(min(fits, key=lambda r: r.cost).x)


def _errors(F: np.ndarray, ref: np.ndarray, base_s: float, ratio: np.ndarray, p: dict[str, float]) -> np.ndarray:
    c = _coefficients(p)
    return ((base_s + F @ c) / (base_s + ref @ c)) / ratio - 1


def _usable(names: Sequence[str], F: np.ndarray, ref: np.ndarray, anchors: Sequence[tuple[np.ndarray, float]]
            ) -> tuple[str, ...]:
    """The parameters whose features vary somewhere (no serial kernel: no ``delta``)."""
    rows = np.vstack([F, ref] + [a for a, _t in anchors])
    col = {n: i + 1 for i, (n, *_) in enumerate(_PARAMS)}  # the column each parameter multiplies
    return tuple(n for n in names if np.any(rows[:, col[n]] != 0))


def fit_terms(features: np.ndarray, reference: np.ndarray, base_s: float, measured_ratio: np.ndarray,
              anchors: Sequence[tuple[np.ndarray, float]] = ()) -> InModelTerms:
    """Fit :class:`InModelTerms` to models timed end to end (see the module docstring).

    ``features[k]`` (:func:`model_features`) describes model ``k``; ``measured_ratio[k]`` is
    its measured time over that of the reference model (``reference``, its features: the
    unpruned model, whose layers may run a sparse format too), timed interleaved. Both
    sides are linear in the terms: ``base + F_k . c = ratio_k (base + F_ref . c)`` with
    ``c = (1, alpha, beta, call, gamma, delta)``. Each of ``anchors`` = (features, measured
    seconds) of a model timed in the same window as ``base_s`` and the loop times (the unpruned
    model, and uniformly pruned ones) adds one absolute equation. A soft-L1 loss keeps one
    disturbed measurement from moving the terms; the bounds are :data:`ALPHA_BOUNDS` and
    :data:`BETA_MIN_S` (per-call terms), ``gamma >= 0``.

    Each of :data:`FORMS` is fitted on each half of the models (alternate ones, the anchors in
    both) and checked on the other half; the form with the lowest median absolute error there
    is kept, refitted on all models, if that error is below the loop times' own. Otherwise the
    identity is returned (``fit.fitted`` False, with the reason), and the table keeps loop times.
    """
    F = np.asarray(features, dtype=np.float64).reshape(len(measured_ratio), -1)
    ref = np.asarray(reference, dtype=np.float64)
    anchors = [(np.asarray(a, dtype=np.float64), float(t)) for a, t in anchors]
    ratio = np.asarray(measured_ratio, dtype=np.float64)
    before = _errors(F, ref, base_s, ratio, _identity())
    held: dict[str, np.ndarray] = {}
    for form, names in FORMS.items():
        names = _usable(names, F, ref, anchors)
        if not names:
            continue
        held_out = np.empty_like(ratio)
        for part in (0, 1):
            train, test = np.arange(len(F)) % 2 != part, np.arange(len(F)) % 2 == part
            if train.sum() < 2:
                held_out[test] = before[test]
                continue
            p = _least_squares(F[train], ref, base_s, ratio[train], anchors, names)
            held_out[test] = _errors(F[test], ref, base_s, ratio[test], p)
        held[form] = held_out
    form = min(held, key=lambda k: float(np.median(np.abs(held[k]))), default=None)
    data = {"features": F.tolist(), "reference": ref.tolist(), "ratios": ratio.tolist(), "base_s": base_s,
            "anchors": [[a.tolist(), t] for a, t in anchors]}
    fit: dict[str, Any] = {"models": int(len(F)), "error_before": _summary(before),
                           "held_out_by_form": {k: _summary(v)["median_abs"] for k, v in held.items()}, "data": data}
    if form is None:
        fit.update(fitted=False, why="no term has a feature that varies between the models")
        return InModelTerms(fit=fit)
    p = _least_squares(F, ref, base_s, ratio, anchors, _usable(FORMS[form], F, ref, anchors))
    fit.update(form=form, **p, error_after=_summary(_errors(F, ref, base_s, ratio, p)),
               error_held_out=_summary(held[form]))
    if anchors:
        c, c0 = _coefficients(p), _coefficients(_identity())
        fit["anchor_error"] = {"before": [float((base_s + a @ c0) / t - 1) for a, t in anchors],
                               "after": [float((base_s + a @ c) / t - 1) for a, t in anchors]}
    fit["fitted"] = bool(fit["error_held_out"]["median_abs"] < fit["error_before"]["median_abs"])
    if not fit["fitted"]:
        fit["why"] = "the terms did not predict the held-out half of the models better than loop times"
        log.warning("in-model terms (%s) did not predict held-out models better than loop times "
                    "(median |error| %.1f%% vs %.1f%%): the table keeps loop times", form,
                    fit["error_held_out"]["median_abs"] * 100, fit["error_before"]["median_abs"] * 100)
        return InModelTerms(fit=fit)
    log.info("in-model terms (%s): alpha %.3f, beta %.1f us, call %.1f us, %.2f ms per M kept weights, serial "
             "%.1f us, from %d models: median |error| %.1f%% -> %.1f%% (held out %.1f%%; signed %+.1f%% -> %+.1f%%)",
             form, p["alpha"], p["beta"] * 1e6, p["call"] * 1e6, p["gamma"] * 1e3, p["delta"] * 1e6, len(F),
             fit["error_before"]["median_abs"] * 100, fit["error_after"]["median_abs"] * 100,
             fit["error_held_out"]["median_abs"] * 100, fit["error_before"]["median"] * 100,
             fit["error_after"]["median"] * 100)
    return InModelTerms(p["alpha"], p["beta"], fit, p["call"], p["gamma"], p["delta"])


def _summary(err: np.ndarray) -> dict[str, float]:
    return {"median_abs": float(np.median(np.abs(err))), "median": float(np.median(err)),
            "max_abs": float(np.max(np.abs(err)))}

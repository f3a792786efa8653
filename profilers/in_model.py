"""In-model terms: how a sparse layer's time inside the model differs from its time alone.

The profiler times each layer alone, in a loop, where its weights and input stay in
the caches and its thread team stays awake. Inside a forward pass the other layers
evict both, and torch's operators run between the sparse kernels, so a pruned model
can take longer than the sum of its layers' loop times, and the very sparse layers,
whose calls are short, lose the most.

So the profile learns the difference from end-to-end measurements: a layer running a
*sparse* kernel format costs ``alpha * t_alone + beta`` inside the model, where
``alpha`` scales the kernel's streaming work and ``beta`` is a fixed cost per call
(thread hand-over between torch's operators and the kernels, relayout, dispatch).
Dense layers keep their loop time, which the dense model confirms. The two terms are
fitted by robust least squares on random pruned models timed end to end, each
interleaved with the unpruned model, so that only the ratio ``pruned / unpruned`` of
one window enters the fit (:func:`fit_terms`). The profiler spreads those
measurements over the whole profiling run, as it does the layer timings, so that the
terms describe the machine's usual state rather than one minute of it. The terms are
shared by all layers: two numbers are what two dozen end-to-end timings can pin down.
The fit is checked on other random models by :func:`spdy.profilers.validate`.

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
    """The in-model cost of a layer running a sparse kernel: ``alpha * t_alone + beta`` seconds."""

    alpha: float = 1.0
    beta: float = 0.0  # seconds per sparse layer call
    fit: dict[str, Any] = field(default_factory=lambda: {"fitted": False})

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and math.isfinite(self.beta)) or self.alpha <= 0:
            raise InvalidInputError(f"in-model terms need a finite alpha > 0 and a finite beta; got {self.alpha}, {self.beta}")

    def apply(self, t_alone: float) -> float:
        """In-model seconds of a sparse layer that took ``t_alone`` in the loop.

        Never below ``ALPHA_BOUNDS[0] * t_alone``: a negative ``beta`` (call overhead the loop
        pays and the model does not) must not make a short call free.
        """
        return max(ALPHA_BOUNDS[0] * t_alone, self.alpha * t_alone + self.beta)

    def to_json(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta_s": self.beta, "fit": self.fit}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "InModelTerms":
        return cls(float(d["alpha"]), float(d["beta_s"]), dict(d.get("fit", {})))


def model_features(alone: Sequence[float], sparse: Sequence[bool]) -> np.ndarray:
    """``[dense-format loop seconds, sparse-format loop seconds, sparse layer count]`` of one model."""
    t = np.asarray(alone, dtype=np.float64)
    on = np.asarray(sparse, dtype=bool)
    return np.array([t[~on].sum(), t[on].sum(), float(on.sum())])


#: Lower bound of the fitted per-call term: a layer's loop time may include a little more per
#: call than the model pays (call overhead), never milliseconds.
BETA_MIN_S = -20e-6


def _least_squares(F: np.ndarray, ref: np.ndarray, base_s: float, ratio: np.ndarray) -> tuple[float, float]:
    from scipy.optimize import least_squares

    scale = np.array([1.0, 1e-5])  # beta is fitted in units of 10 us

    def f(p: np.ndarray) -> np.ndarray:
        t, t_ref = _predict(F, ref, base_s, 1.0 + p[0], p[1] * scale[1])
        return (t - ratio * t_ref) / t_ref

    lo, hi = [ALPHA_BOUNDS[0] - 1, BETA_MIN_S / scale[1]], [ALPHA_BOUNDS[1] - 1, np.inf]
    p = least_squares(f, np.zeros(2), bounds=(lo, hi), loss="soft_l1", f_scale=0.01).x
    return 1.0 + float(p[0]), float(p[1] * scale[1])


def _predict(F: np.ndarray, ref: np.ndarray, base_s: float, alpha: float, beta: float) -> tuple[np.ndarray, float]:
    """Predicted times of the models and of the reference under the terms."""
    return (base_s + F[:, 0] + alpha * F[:, 1] + beta * F[:, 2],
            base_s + ref[0] + alpha * ref[1] + beta * ref[2])


def _errors(F: np.ndarray, ref: np.ndarray, base_s: float, ratio: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    t, t_ref = _predict(F, ref, base_s, alpha, beta)
    return (t / t_ref) / ratio - 1


def fit_terms(features: np.ndarray, reference: np.ndarray, base_s: float, measured_ratio: np.ndarray) -> InModelTerms:
    """Fit :class:`InModelTerms` to models timed end to end (see the module docstring).

    ``features[k]`` (:func:`model_features`) describes model ``k``; ``measured_ratio[k]`` is
    its measured time over that of the reference model (``reference``, its features: the
    unpruned model, whose layers may run a sparse format too), timed interleaved. Both
    sides are linear in the terms: ``base + D_k + alpha S_k + beta n_k = ratio_k (base +
    D_ref + alpha S_ref + beta n_ref)``. A soft-L1 loss keeps one disturbed measurement
    from moving the terms; ``alpha`` is bounded by :data:`ALPHA_BOUNDS`, ``beta`` from below
    by :data:`BETA_MIN_S`.

    The terms are kept only if they predict models they were not fitted on: fitted on each
    half of the models (alternate ones), checked on the other half, they must lower the
    median absolute error there; otherwise the identity is returned (``fit.fitted`` False,
    with the reason), and the table keeps loop times.
    """
    F = np.asarray(features, dtype=np.float64).reshape(-1, 3)
    ref = np.asarray(reference, dtype=np.float64)
    ratio = np.asarray(measured_ratio, dtype=np.float64)
    before = _errors(F, ref, base_s, ratio, 1.0, 0.0)
    held_out = np.empty_like(ratio)
    for part in (0, 1):
        train, test = np.arange(len(F)) % 2 != part, np.arange(len(F)) % 2 == part
        if train.sum() < 2:
            held_out[test] = before[test]
            continue
        a, b = _least_squares(F[train], ref, base_s, ratio[train])
        held_out[test] = _errors(F[test], ref, base_s, ratio[test], a, b)
    alpha, beta = _least_squares(F, ref, base_s, ratio)
    fit = {"models": int(len(F)), "alpha": alpha, "beta_s": beta, "error_before": _summary(before),
           "error_after": _summary(_errors(F, ref, base_s, ratio, alpha, beta)),
           "error_held_out": _summary(held_out)}
    fit["fitted"] = bool(fit["error_held_out"]["median_abs"] < fit["error_before"]["median_abs"])
    if not fit["fitted"]:
        fit["why"] = "the terms did not predict the held-out half of the models better than loop times"
        log.warning("in-model terms (alpha %.3f, beta %.1f us) did not predict held-out models better than loop times "
                    "(median |error| %.1f%% vs %.1f%%): the table keeps loop times", alpha, beta * 1e6,
                    fit["error_held_out"]["median_abs"] * 100, fit["error_before"]["median_abs"] * 100)
        return InModelTerms(1.0, 0.0, fit)
    log.info("in-model terms alpha %.3f, beta %.1f us from %d models: median |error| %.1f%% -> %.1f%% "
             "(held out %.1f%%; signed %+.1f%% -> %+.1f%%)", alpha, beta * 1e6, len(F),
             fit["error_before"]["median_abs"] * 100, fit["error_after"]["median_abs"] * 100,
             fit["error_held_out"]["median_abs"] * 100, fit["error_before"]["median"] * 100,
             fit["error_after"]["median"] * 100)
    return InModelTerms(alpha, beta, fit)


def _summary(err: np.ndarray) -> dict[str, float]:
    return {"median_abs": float(np.median(np.abs(err))), "median": float(np.median(err)),
            "max_abs": float(np.max(np.abs(err)))}

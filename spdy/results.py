"""What a search hands back and what it writes: :class:`Outcome`, :class:`SearchOutcome` and ``OUT/``.

:func:`write_outputs` writes a search's ``result.json`` (schema :data:`RESULT_SCHEMA`),
the pruned weights (``model/``) and a plot; :func:`load_result` reads the JSON back and
:func:`result_model_dir` finds the weights for :func:`spdy.apply`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:  # before torch: torch and the spdy kernels then share one OpenMP pool
    import spdy.kernels  # noqa: F401
except ImportError:  # pragma: no cover - numba missing
    pass

from spdy import __version__
from spdy.errors import InvalidInputError
from spdy.io import atomic_write_json, read_json
from spdy.models.base import ModelBundle, batchnorm_state
from spdy.types import Solution

#: The least gap between two rounds' gains from the second thread (ONNX Runtime's one-thread time
#: over its time on the backend's threads) that splits the rounds into two states of the machine.
STATE_GAP = 0.15


def split_states(gains: Any, gap: float = STATE_GAP) -> list[int]:
    """Each round's state from its gain from the extra threads: 1 (fast) above the widest gap
    between the sorted gains, 0 (slow) below, when that gap is wider than ``gap`` and each side
    holds at least two rounds; otherwise all 1 (one state)."""
    g = np.asarray(gains, dtype=np.float64)
    if len(g) < 4:
        return [1] * len(g)
    s = np.sort(g)
    widths = np.diff(s)[1:-1]  # at least two rounds on each side
    k = int(np.argmax(widths)) + 1
    if widths[k - 1] <= gap:
        return [1] * len(g)
    cut = (s[k] + s[k + 1]) / 2
    return [int(x > cut) for x in g]


RESULT_SCHEMA = "spdy.search-result"
#: 2: ``measured_speedup`` is over the reference dense runtime (``reference``), not over the dense plan
RESULT_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Outcome:
    """One per-layer sparsity profile (SPDY's or a baseline's) and how it did; each layer's
    kernel format is its solution's (the profile's format for its choice)."""

    method: str
    solution: Solution
    calibration_loss: float
    measured_time_s: float | None = None
    #: over the reference dense runtime (the search's ``reference``)
    measured_speedup: float | None = None
    dense_time_s: float | None = None  # the dense plan's time in the same measurement
    #: every end-to-end speedup over the reference measured for this model during the run (one per round)
    speedup_samples: tuple[float, ...] = ()
    #: the same over each dense runtime measured (``torch``, ``onnxruntime``, ``dense_plan``)
    runtime_samples: dict[str, tuple[float, ...]] = field(default_factory=dict)
    #: the percentile of each runtime's samples that ``measured_speedup`` is of the reference's
    runtime_speedups: dict[str, float] = field(default_factory=dict)

    def speedup_summary(self, runtime: str | None = None) -> dict[str, Any] | None:
        """Median, 10th and 90th percentile and count of :attr:`speedup_samples` (or of ``runtime``'s
        samples; None without any)."""
        samples = self.speedup_samples if runtime is None else self.runtime_samples.get(runtime, ())
        if not samples:
            return None
        s = np.asarray(samples)
        return {"rounds": len(s), "median": float(np.median(s)), "p10": float(np.percentile(s, 10)),
                "p90": float(np.percentile(s, 90)), "min": float(s.min()), "max": float(s.max())}

    def speedups_by_runtime(self) -> dict[str, dict[str, Any]]:
        """``{runtime: {"speedup", "rounds", "median", "p10", "p90", "min", "max"}}`` over each dense runtime."""
        from spdy.profilers.dense_runtimes import STATE_PROBE

        return {rt: {"speedup": self.runtime_speedups.get(rt), **(self.speedup_summary(rt) or {})}
                for rt in self.runtime_samples if rt != STATE_PROBE}

    def speedups_by_state(self) -> dict[str, Any] | None:
        """The rounds split by the machine's state, and per state the rounds, the median gain
        from the extra threads and the median speedup over each dense runtime; None unless ONNX
        Runtime was timed on one thread (``STATE_PROBE``) in every round.

        ONNX Runtime on one thread keeps its speed in every state, so it is the yardstick: each
        round's ``gain`` (its time over ONNX Runtime's on the backend's threads) reads the state of
        ONNX Runtime's block, and its time over the dense plan's reads the state of the plans'
        block (:func:`split_states` on each). A round whose two blocks agree is ``fast`` or
        ``slow``; one whose blocks fell in different states is ``mixed`` and left out of both (its
        speedups over ONNX Runtime read far off either way). When neither series shows two states,
        every round is ``all``; when only one does, every round is ``mixed``. On two virtual CPUs
        that slow each other in spells, the slow state is where ONNX Runtime gains least and the
        speedups over it read highest."""
        from spdy.profilers.dense_runtimes import DENSE_PLAN, ONNXRUNTIME, STATE_PROBE

        one = np.asarray(self.runtime_samples.get(STATE_PROBE, ()), dtype=np.float64)
        many = np.asarray(self.runtime_samples.get(ONNXRUNTIME, ()), dtype=np.float64)
        plan = np.asarray(self.runtime_samples.get(DENSE_PLAN, ()), dtype=np.float64)
        if not len(one) or len(one) != len(many):
            return None
        gains = one / many  # (t_one / t_pruned) / (t_ort / t_pruned): ONNX Runtime's block
        ort = np.asarray(split_states(gains))
        # the dense plan against the yardstick: the plans' block (ONNX Runtime's states alone without it)
        plan_state = np.asarray(split_states(one / plan)) if len(plan) == len(one) else ort
        if ort.all() and plan_state.all():
            both, names = ort, {1: "all"}
        elif ort.all() or plan_state.all():
            # one kind of block changed state and the other did not: which state the other was in is unknown
            both, names = np.full(len(gains), -1), {-1: "mixed"}
        else:
            both, names = np.where(ort == plan_state, ort, -1), {1: "fast", 0: "slow", -1: "mixed"}
        out: dict[str, Any] = {"gains": [float(x) for x in gains], "states": [names[int(x)] for x in both]}
        for which, label in names.items():
            mask = both == which
            if not mask.any():
                continue
            out[label] = {"rounds": int(mask.sum()), "gain": float(np.median(gains[mask]))}
            if which >= 0:
                out[label]["speedup_by_runtime"] = {
                    rt: float(np.median(np.asarray(v, dtype=np.float64)[mask]))
                    for rt, v in self.runtime_samples.items() if rt != STATE_PROBE and len(v) == len(gains)}
        return out

    def layers(self) -> dict[str, dict[str, Any]]:
        """``{layer: {"sparsity", "level", "pattern"[, "format"]}}`` (``level``: the grid level, 0 for N:M)."""
        sol = self.solution
        out = {}
        for i, (name, c) in enumerate(zip(sol.layers, sol.choices)):
            rec: dict[str, Any] = {"sparsity": float(sol.sparsities[i]), "level": c.level, "pattern": c.pattern}
            if sol.formats is not None:
                rec["format"] = sol.formats[i]
            out[name] = rec
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "predicted_speedup": self.solution.predicted_speedup,
            "predicted_time_s": self.solution.predicted_time_s,
            "measured_speedup": self.measured_speedup,
            "measured_speedup_samples": self.speedup_summary(),
            "measured_speedup_by_runtime": self.speedups_by_runtime(),
            "measured_speedup_by_state": self.speedups_by_state(),
            "measured_time_s": self.measured_time_s,
            "calibration_loss": self.calibration_loss,
            "layers": self.layers(),
        }


@dataclass(frozen=True)
class SearchOutcome:
    """What :func:`search` found: the chosen profile, the baselines and the measurements."""

    model: str
    backend: str
    target_speedup: float
    result: Outcome
    dense_loss: float
    baselines: dict[str, Outcome | str] = field(default_factory=dict)
    dense_measured_s: float | None = None
    base_drift: float | None = None
    n_evaluations: int = 0
    study: str = ""
    storage: str | None = None
    profile_path: str | None = None
    database_path: str | None = None
    stage_s: dict[str, float] = field(default_factory=dict)
    per_evaluation_ms: dict[str, float] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    out: str | None = None
    latency_correction: dict[str, Any] | None = None
    dp_target_speedup: float | None = None
    fit: tuple[dict[str, Any], ...] = ()
    quality: dict[str, Any] | None = None
    #: what ``measured_speedup`` is over (:meth:`spdy.reference.Reference.to_json`)
    reference: dict[str, Any] | None = None
    #: the dense model's median time in each runtime during the final measurement
    dense_runtime_s: dict[str, float] = field(default_factory=dict)

    @property
    def predicted_speedup(self) -> float:
        return self.result.solution.predicted_speedup

    @property
    def measured_speedup(self) -> float | None:
        return self.result.measured_speedup

    @property
    def calibration_loss(self) -> float:
        return self.result.calibration_loss

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        return self.result.layers()

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": RESULT_SCHEMA,
            "schema_version": RESULT_SCHEMA_VERSION,
            "spdy_version": __version__,
            "model": self.model,
            "backend": self.backend,
            "method": self.result.method,
            "target_speedup": self.target_speedup,
            "reference": self.reference,
            "predicted_speedup": self.predicted_speedup,
            "dp_target_speedup": self.dp_target_speedup,
            "latency_correction": self.latency_correction,
            "fit": list(self.fit),
            "measured_speedup": self.measured_speedup,
            "measured_speedup_samples": self.result.speedup_summary(),
            "measured_speedup_by_runtime": self.result.speedups_by_runtime(),
            "measured_speedup_by_state": self.result.speedups_by_state(),
            "measured_time_s": self.result.measured_time_s,
            "dense_measured_time_s": self.dense_measured_s,
            "dense_measured_time_s_by_runtime": self.dense_runtime_s,
            "base_drift": self.base_drift,
            "calibration_loss": {"dense": self.dense_loss, "pruned": self.calibration_loss},
            "layers": self.layers,
            "baselines": {k: (v.to_json() if isinstance(v, Outcome) else {"error": v}) for k, v in self.baselines.items()},
            "search": {"evaluations": self.n_evaluations, "study": self.study, "storage": self.storage,
                       "per_evaluation_ms": self.per_evaluation_ms},
            "profile": self.profile_path,
            "database": self.database_path,
            "stage_seconds": self.stage_s,
            "settings": self.settings,
            "warnings": list(self.warnings),
            "quality": self.quality,
            "fingerprint": self.fingerprint,
        }


def write_outputs(outcome: SearchOutcome, bundle: ModelBundle, database: Any, table: Any,
                  out: str | os.PathLike[str]) -> SearchOutcome:
    """``OUT/result.json``, ``OUT/model`` (pruned weights) and ``OUT/profile.png``."""
    from spdy.export import save_pruned
    from spdy.report import plot_profile

    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    outcome = dataclasses.replace(outcome, out=str(o))
    pruned = bundle.retune_batchnorm(database.stitch(bundle.model, outcome.result.solution, inplace=False))
    save_pruned(pruned, outcome.layers, o / "model", buffers=batchnorm_state(pruned) if bundle.tune_batchnorm else None,
                meta={
        "model": outcome.model, "backend": outcome.backend, "target_speedup": outcome.target_speedup,
        "predicted_speedup": outcome.predicted_speedup, "measured_speedup": outcome.measured_speedup,
        "method": outcome.result.method, "calibration_id": bundle.calibration_id,
        "batchnorm_folds": [p.to_json() for p in bundle.batchnorm_folds], "fingerprint": outcome.fingerprint,
        **_depthwise_fusions(outcome, bundle),
    })
    del pruned
    bases = {n: b.solution for n, b in outcome.baselines.items() if isinstance(b, Outcome)}
    plot_profile(table, outcome.result.solution, o / "profile.png", baselines=bases, title=plot_title(outcome))
    atomic_write_json(o / "result.json", outcome.to_json())
    return outcome


def _depthwise_fusions(outcome: SearchOutcome, bundle: ModelBundle) -> dict[str, Any]:
    """``{"depthwise_fusions": [...]}`` when the result was timed with spdy's depthwise kernel:
    the pads and activations each depthwise convolution of the timed (inference) form absorbed,
    for ``spdy.apply(sparse=True)`` to run the same."""
    if (outcome.fingerprint or {}).get("depthwise") != "spdy":
        return {}
    from spdy import runtime

    inference = bundle.inference
    fusions = runtime.find_depthwise(inference.model, lambda m: inference.forward(m, inference.example))
    return {"depthwise_fusions": [f.to_json() for f in fusions]}


def plot_title(outcome: SearchOutcome) -> str:
    """The plot's title: the target and its reference, the measured speedup over each dense
    runtime (the reference first) with its 10th-90th percentile over the rounds, and the prediction."""
    import textwrap

    from spdy.profilers.dense_runtimes import DENSE_PLAN, LABELS

    ref = outcome.reference or {}
    label = ref.get("label") or f"the {LABELS[DENSE_PLAN]}"
    asked = f" (--reference {ref['asked']})" if ref.get("asked") else ""
    head = f"{outcome.model} on {outcome.backend}: target {outcome.target_speedup:g}x over {label}{asked}"
    by = outcome.result.speedups_by_runtime()
    order = sorted(by, key=lambda rt: rt != ref.get("runtime"))
    parts = [f"{LABELS.get(rt, rt)} {by[rt]['speedup']:.2f}x (p10-p90 {by[rt]['p10']:.2f}-{by[rt]['p90']:.2f})"
             for rt in order if by[rt].get("speedup") is not None]
    if parts:
        body = "measured over " + ", ".join(parts)
    else:
        body = f"measured {outcome.measured_speedup:.2f}x over {label}" if outcome.measured_speedup else "not measured"
    body += f"; predicted {outcome.predicted_speedup:.2f}x over the {LABELS[DENSE_PLAN]}"
    nbsp = "\u00a0"  # keeps each runtime's figures on one line
    return "\n".join([head, *(line.replace(nbsp, " ") for line in textwrap.wrap(
        body.replace(" (p10-p90 ", f"{nbsp}(p10-p90{nbsp}"), 90, break_on_hyphens=False))])


def result_model_dir(result: SearchOutcome | str | os.PathLike[str]) -> Path:
    """The folder with a search's pruned weights: ``OUT/model`` of a written result (or that folder itself)."""
    if isinstance(result, SearchOutcome):
        if result.out is None:
            raise InvalidInputError("this search result was not written to disk; run spdy.search(..., out=DIR) first")
        return Path(result.out) / "model"
    p = Path(result)
    if (p / "model" / "manifest.json").exists():
        return p / "model"
    if (p / "manifest.json").exists():
        return p
    raise InvalidInputError(f"{str(p)!r} holds no pruned model (expected OUT/model/manifest.json from 'spdy search -o OUT')")


def load_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``OUT/result.json`` as a dict (``path`` is OUT or the file)."""
    p = Path(path)
    if p.is_dir():
        p = p / "result.json"
    d = read_json(p, "search result")
    if d.get("schema") != RESULT_SCHEMA:
        raise InvalidInputError(f"{p} is not an spdy search result (schema {d.get('schema')!r})")
    return d

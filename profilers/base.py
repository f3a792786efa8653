"""The latency backend interface and the one timing discipline every backend shares.

A backend knows how to *run* things in its runtime: one prunable layer in one
kernel format on the layer's real input shape (:meth:`Backend.layer_runner`), and
the whole model with each prunable layer in a chosen format, or replaced by a
zero-cost stand-in (:meth:`Backend.model_runner`). It never times anything itself:
:meth:`Backend.measure` owns warm-up, repeats, interleaving, stopping, median and
spread, so that backends cannot diverge. A backend only says how to read its clock
(:meth:`Backend._sample`; CUDA events on the GPU, ``perf_counter`` elsewhere).

Timing discipline (each rule keeps one way a timing can lie out of the table):

* thread counts are fixed once, when the backend is made, and recorded;
* every runner is warmed up; calls shorter than ``min_sample_s`` are batched
  so that one sample lasts at least that long;
* the runners being compared are *interleaved*, round by round, so that a slow
  spell of the machine (another process, frequency changes) hits all of them alike;
* each runner is sampled until the confidence interval of its median is within
  ``target_ci`` (relative), or ``max_repeats`` samples, or ``max_seconds`` spent;
* a runner that clearly loses to a rival (another format for the same level) is
  dropped early (``race_ratio``): only the fastest format's time is needed;
* samples taken while other processes used the CPUs (``/proc/stat`` minus this
  process's own CPU time, judged per window of ~0.3 s) are discarded, and timing
  waits for the others to go quiet: a busy neighbour on a small machine slows a
  multi-threaded kernel by a large factor, and no statistic undoes that;
* layers are timed in ``passes`` passes over the whole model (alternating order)
  and each level keeps the median of its pass medians, so that a slow spell during
  one layer's turn does not end up in the table.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from spdy.errors import InvalidInputError
from spdy.hardware import fingerprint as hardware_fingerprint
from spdy.types import LayerSpec

log = logging.getLogger(__name__)

Runner = Callable[[], Any]

#: Environment variables that change how thread pools behave (and so the timings); recorded.
THREADING_ENV = frozenset({
    "OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", "OMP_WAIT_POLICY", "OMP_DYNAMIC", "GOMP_SPINCOUNT",
    "GOMP_CPU_AFFINITY", "KMP_BLOCKTIME", "KMP_AFFINITY", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER", "SPDY_SHARED_OPENMP",
})

#: Format name of the zero-cost stand-in used to measure the base time.
STANDIN = "standin"
#: Format name of the dense kernel; every backend offers it at every level.
DENSE = "dense"
#: Format of an N:M pattern entry for which the backend has no kernel (time ``+inf``).
NO_KERNEL = ""


@dataclass(frozen=True)
class TimingPolicy:
    """How long and how often to time one runner.

    ``target_ci`` is the relative half-width of the ~95% confidence interval of the
    median (boxplot notch: ``1.57 * IQR / sqrt(n)``); sampling stops once it is met
    after ``min_repeats`` samples, or at ``max_repeats`` samples, or after
    ``max_seconds`` of calls (but never below ``min_samples`` samples).

    Contention: on Linux, samples are judged in windows of at least ``window_s``; if
    other processes used more than ``max_others`` of all CPUs during a window
    (:class:`CpuMonitor`), its samples are discarded (they timed the neighbour as much as
    the kernel) and timing waits, in ``busy_sleep_s`` steps,
    until the others are quiet. After ``patience_s`` of disturbance over the backend's life, samples are kept
    regardless (with a warning, and counted in ``Backend.stats``). ``max_others = inf`` turns the check off. ``passes`` is the number of passes
    over the model's layers in :func:`spdy.profilers.profile_model`; ``model_min_repeats`` the least
    samples for a whole model. With ``lockstep`` every runner takes samples until all of them are
    done, so that their medians come from the same rounds (a runner that stopped early would be
    compared with the others' samples from a later minute, and on these machines the minutes
    differ); :meth:`for_models` sets it. With ``shuffle`` each round visits the runners in a new
    random order (seeded, so a run repeats); :meth:`for_models` sets it too.

    ``block_calls``: each runner's turn in a round is one untimed call and then ``block_calls``
    samples in a row (1: one sample a turn, no untimed call). A whole model called right after
    another one runs in the caches its predecessor left: timed call by call among the dense
    runtimes and pruned models of a search, a dense MiniLM ran 8-12% slower and a pruned one
    about 6% slower than in a loop of its own, which is how a deployed model runs, and the
    pruned model's speedup read about 6% high. ``for_models(blocks=True)`` sets ``model_block_calls``:
    the end-to-end measurements that stand for a deployed model (a search's rounds) run so, while
    a profile's own model timings and its validation keep one call a turn, the protocol its
    in-model terms were fitted in.
    """

    warmup_calls: int = 2
    min_repeats: int = 10
    max_repeats: int = 40
    target_ci: float = 0.03
    max_seconds: float = 0.5
    min_samples: int = 5
    min_sample_s: float = 5e-4
    race_ratio: float = 1.3
    race_after: int = 5
    passes: int = 3
    model_min_repeats: int = 25
    max_others: float = 0.05
    window_s: float = 0.3
    busy_sleep_s: float = 0.1
    patience_s: float = 600.0
    lockstep: bool = False
    shuffle: bool = False
    block_calls: int = 1
    model_block_calls: int = 8

    def __post_init__(self) -> None:
        if self.min_samples < 1 or self.min_repeats < self.min_samples or self.max_repeats < self.min_repeats:
            raise InvalidInputError(
                "timing policy needs 1 <= min_samples <= min_repeats <= max_repeats; got "
                f"{self.min_samples}, {self.min_repeats}, {self.max_repeats}"
            )
        if self.warmup_calls < 0 or self.max_seconds <= 0 or self.target_ci < 0 or self.min_sample_s < 0:
            raise InvalidInputError(f"timing policy values must be non-negative (max_seconds > 0); got {self}")
        if self.race_ratio < 1:
            raise InvalidInputError(f"race_ratio must be >= 1 (use math.inf to never drop); got {self.race_ratio}")
        if self.block_calls < 1 or self.model_block_calls < 1:
            raise InvalidInputError(f"block_calls and model_block_calls must be >= 1; got {self.block_calls}, "
                                    f"{self.model_block_calls}")

    def for_models(self, blocks: bool = False) -> "TimingPolicy":
        """The policy for whole models: one pass with at least ``model_min_repeats`` samples, in lockstep,
        in a shuffled order; with ``blocks``, each turn a block of ``model_block_calls`` samples after an
        untimed call, as a loop of one model runs."""
        reps = max(self.model_min_repeats, self.min_repeats)
        return replace(self, min_repeats=reps, max_repeats=max(self.max_repeats, 2 * reps), race_ratio=math.inf,
                       max_seconds=self.max_seconds * max(1, self.passes) * 4, passes=1, lockstep=True,
                       shuffle=True, block_calls=self.model_block_calls if blocks else 1)

    def to_json(self) -> dict[str, Any]:
        return {k: (v if not (isinstance(v, float) and math.isinf(v)) else "inf") for k, v in asdict(self).items()}


#: Short timings for tests and smoke runs.
QUICK_POLICY = TimingPolicy(warmup_calls=1, min_repeats=5, max_repeats=10, target_ci=0.2, max_seconds=0.2,
                            min_samples=3, min_sample_s=1e-4, race_after=3, passes=1, model_min_repeats=5,
                            patience_s=5.0, model_block_calls=2)


@dataclass(frozen=True)
class Timing:
    """The summary of one runner's samples (seconds per call)."""

    median_s: float
    spread: float  # (q75 - q25) / median of the samples
    ci: float  # relative half-width of the median's confidence interval
    n: int  # samples
    inner: int  # calls per sample
    dropped: bool = False  # stopped early because a rival was clearly faster
    discarded: int = 0  # samples thrown away because another process competed for the CPU

    @classmethod
    def from_samples(cls, samples: Sequence[float], inner: int, dropped: bool = False, discarded: int = 0) -> "Timing":
        arr = np.asarray(samples, dtype=np.float64)
        med = float(np.median(arr))
        if len(arr) >= 2:
            q1, q3 = np.quantile(arr, [0.25, 0.75])
            iqr = float(q3 - q1)
        else:
            iqr = 0.0
        spread = iqr / med if med > 0 else 0.0
        ci = 1.57 * spread / math.sqrt(len(arr)) if len(arr) >= 2 else math.inf
        return cls(med, spread, ci, len(arr), inner, dropped, discarded)


def as_numpy(out: Any) -> np.ndarray:
    """A runner's output (torch tensor, ONNX Runtime OrtValue or numpy array) as a float32 numpy array."""
    if isinstance(out, np.ndarray):
        return out.astype(np.float32, copy=False)
    mod = type(out).__module__
    if mod.startswith("torch"):
        return out.detach().float().cpu().numpy()
    if hasattr(out, "numpy"):
        return np.asarray(out.numpy(), dtype=np.float32)
    raise InvalidInputError(f"cannot read a runner output of type {type(out).__name__} as an array")


class CpuMonitor:
    """How much of the machine's CPU time other processes (or the hypervisor) took.

    Reads ``/proc/stat`` (busy jiffies of all CPUs, steal included) and subtracts this
    process's own CPU time (``time.process_time``, every thread). That isolates *other*
    processes: pressure-stall counters (``/proc/pressure/cpu``) cannot, because a
    process with two OpenMP pools stalls itself. Jiffies are 10 ms ticks, so judge
    windows of a few hundred milliseconds. ``available`` is False off Linux.
    """

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._cpus = os.cpu_count() or 1
        try:
            self.snapshot()
            self.available = True
        except (OSError, ValueError, IndexError):
            self.available = False

    def snapshot(self) -> tuple[float, float, float]:
        """(busy CPU seconds of the machine, CPU seconds of this process, wall seconds)."""
        with open("/proc/stat", "rb") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = sum(v[:8]) - v[3] - v[4]  # user nice system idle iowait irq softirq steal: all but idle, iowait
        return busy / self._tick, time.process_time(), time.perf_counter()

    def others_share(self, start: tuple[float, float, float], end: tuple[float, float, float] | None = None) -> float:
        """Share (0..1) of all CPUs that others used between two snapshots."""
        end = end or self.snapshot()
        wall = max(end[2] - start[2], 1e-9)
        # busy time comes in whole ticks: forgive two of them (rounding at both ends)
        others = (end[0] - start[0]) - (end[1] - start[1]) - 2.0 / self._tick
        return min(max(others, 0.0) / (wall * self._cpus), 1.0)

    def others_busy(self, window_s: float = 0.1) -> float:
        """Share of all CPUs others use while this process sleeps ``window_s``."""
        s0 = self.snapshot()
        time.sleep(window_s)
        return self.others_share(s0)


@dataclass(frozen=True)
class LayerChoice:
    """How one prunable layer runs in a model: its (pruned) weight and kernel format.

    ``weight`` is the full dense-shaped weight with zeros where pruned (numpy,
    float32); ``bias`` may be None. ``fmt`` is one of the backend's formats, or
    :data:`STANDIN` (then weight and bias are unused).
    """

    fmt: str
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    sparsity: float = 0.0


@dataclass(frozen=True)
class LevelTiming:
    """The time of one layer at one sparsity: the fastest format and every format tried."""

    sparsity: float
    fmt: str
    time_s: float
    spread: float
    candidates: dict[str, Timing] = field(default_factory=dict)


class Backend(ABC):
    """A runtime in which layers and models are timed. Subclasses register with :func:`register`.

    Subclasses implement :meth:`layer_formats`, :meth:`layer_runner`, :meth:`model_runner`
    and, where needed, :meth:`_configure_threads`, :meth:`runtime_fingerprint`,
    :meth:`unavailable_reason` and :meth:`_sample`. Timing goes through :meth:`measure`.
    """

    name: ClassVar[str] = "abstract"
    description: ClassVar[str] = ""

    def __init__(self, threads: int | None = None, policy: TimingPolicy | None = None) -> None:
        reason = self.unavailable_reason()
        if reason:
            from spdy.errors import BackendUnavailableError

            raise BackendUnavailableError(f"backend {self.name!r} cannot run here: {reason}")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if threads is None:
            threads = cores
        if int(threads) < 1:
            raise InvalidInputError(f"threads must be >= 1; got {threads}")
        if threads > cores:
            log.warning("%d threads on %d usable cores: timings will suffer from oversubscription", threads, cores)
        self.threads = int(threads)
        self.policy = policy or TimingPolicy()
        self.stats: dict[str, Any] = {"samples": 0, "discarded": 0, "busy_wait_s": 0.0, "busy_giveups": 0}
        self._monitor = CpuMonitor()
        self._configure_threads()

    # ----------------------------------------------------------------- availability, provenance

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the backend can run here; otherwise what is missing and what to install."""
        return None

    def _configure_threads(self) -> None:
        """Fix every thread pool this backend touches to ``self.threads`` (called once, at init)."""

    def runtime_fingerprint(self) -> dict[str, Any]:
        """Runtime details beyond :func:`spdy.hardware.fingerprint` (versions, GPU name, driver)."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """CPU model, cores, threads, runtime versions, the threading environment and the backend's own details."""
        env = {k: os.environ[k] for k in sorted(os.environ) if k in THREADING_ENV}
        return hardware_fingerprint(self.threads, {"backend": self.name, "threading_env": env,
                                                   **self.runtime_fingerprint()})

    def settings(self) -> dict[str, Any]:
        """What the timings depend on besides the hardware: threads and the timing policy."""
        return {"threads": self.threads, "timing": self.policy.to_json()}

    # ----------------------------------------------------------------- what backends implement

    @abstractmethod
    def layer_formats(self, spec: LayerSpec, sparsity: float) -> tuple[str, ...]:
        """Kernel formats worth timing for this layer at this sparsity; always includes :data:`DENSE`."""

    def pattern_formats(self, spec: LayerSpec, pattern: str) -> tuple[str, ...]:
        """Kernel formats (besides dense) that run this layer with an N:M (``"2:4"``) weight;
        empty (the default) when the runtime has no kernel for the pattern, in which case the
        pattern is not a choice for the layer (see :mod:`spdy.choices`)."""
        return ()

    @abstractmethod
    def layer_runner(self, spec: LayerSpec, choice: LayerChoice, x: np.ndarray | None = None) -> Runner:
        """A zero-argument callable running the layer once on an input of ``spec.input_shape``
        and returning its output (readable with :func:`as_numpy`).

        ``x`` is that input (float32); None means random values.
        """

    @abstractmethod
    def model_runner(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> Runner:
        """A zero-argument callable running ``bundle``'s model once on ``bundle.example``, end to end,
        with each layer named in ``choices`` run as chosen (layers not named stay as they are);
        it returns the model's output (readable with :func:`as_numpy`).
        """

    def fused_pairs(self, bundle: Any, specs: Sequence[LayerSpec]) -> list[tuple[int, int]]:
        """Pairs of ``specs`` (indices) that this runtime runs as one fused block when both are in a
        format of :data:`spdy.types.FUSED_FORMATS`; empty (the default) when it fuses nothing."""
        return []

    def fusion_runners(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> tuple[Runner, Runner]:
        """Two :meth:`model_runner` of the same plan, with the fused pairs fused and with each layer
        run on its own, to measure what fusing saves (only for a backend with :meth:`fused_pairs`)."""
        raise NotImplementedError(f"backend {self.name!r} fuses no layers")

    def fused_triples(self, bundle: Any, specs: Sequence[LayerSpec]) -> list[tuple[int, int, int]]:
        """Triples of ``specs`` (indices) that read one input and that this runtime runs as one call
        when all three are in a format of :data:`spdy.types.FUSED_FORMATS` (a self-attention's
        query, key and value); empty (the default) when it runs each on its own."""
        return []

    def triple_fusion_runners(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> tuple[Runner, Runner]:
        """Two :meth:`model_runner` of the same plan, with the fused triples run as one call and with
        each layer on its own (only for a backend with :meth:`fused_triples`)."""
        raise NotImplementedError(f"backend {self.name!r} runs no layers as one call")

    def fused_singles(self, bundle: Any, specs: Sequence[LayerSpec]) -> list[tuple[int]]:
        """Layers of ``specs`` (indices, as one-element groups) that this runtime runs with the work
        after them in their epilogue when in a format of :data:`spdy.types.FUSED_FORMATS` (a
        self-attention's output projection with the residual and the LayerNorm); empty (the default)
        when it fuses none."""
        return []

    def single_fusion_runners(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> tuple[Runner, Runner]:
        """Two :meth:`model_runner` of the same plan, with the fused singles' epilogues and without
        (only for a backend with :meth:`fused_singles`)."""
        raise NotImplementedError(f"backend {self.name!r} fuses no epilogues")

    def planned_layers(self, bundle: Any, specs: Sequence[LayerSpec]) -> list[tuple[int, ...]]:
        """Groups of ``specs`` (indices: one fused pair, one fused triple and one fused single each)
        that this runtime runs faster still when every group of the set is fused (a BERT encoder
        layer run from a plan of its kernel calls); empty (the default) when there is none."""
        return []

    def plan_runners(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> tuple[Runner, Runner]:
        """Two :meth:`model_runner` of the same plan, every fusion on, with the :meth:`planned_layers`
        planned and without (only for a backend with :meth:`planned_layers`)."""
        raise NotImplementedError(f"backend {self.name!r} plans no layers")

    def unfused_runner(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> Runner:
        """A :meth:`model_runner` of the plan with each layer run on its own, every fusion of the
        runtime off (what the profile's per-layer times add up to before the fused groups' savings
        come off). Default: :meth:`model_runner`, for a runtime that fuses nothing."""
        return self.model_runner(bundle, choices)

    def layer_call_overhead_s(self) -> float:
        """Seconds a layer runner pays per call that the layer does not pay inside the model
        (e.g. ONNX Runtime's per-``Run`` cost); subtracted from layer times. Default 0."""
        return 0.0

    def timing_context(self) -> Any:
        """A context entered once around every :meth:`measure` (e.g. ``torch.inference_mode()``),
        so that runners do not pay for entering it on every call."""
        return contextlib.nullcontext()

    #: seconds to wait between timing groups of different thread pools
    pool_rest_s: float = 0.02

    def pool_of(self, fmt: str) -> str:
        """The thread pool a format runs in. Runners of different pools are not interleaved:
        one pool's idle workers spin while the other's run, which a model avoids only if its
        runtime shares one pool. Default: one pool for everything."""
        return "default"

    def shares_layer_measurements(self) -> bool:
        """True when a layer's time depends only on its shape group (kind, weight and input shape,
        bias, geometry; :func:`spdy.profilers.in_model.group_key`) and its pruned weight, not on
        the model around it: the profiler then times a group's layers in turns rather than each
        one in full. Backends whose layer runners are standalone modules or sessions qualify."""
        return True

    def dense_time_is_level_independent(self) -> bool:
        """True when the dense kernel's speed does not depend on how many weights are zero,
        so it is timed once per layer rather than at every level."""
        return True

    # ----------------------------------------------------------------- the timing discipline

    def _sample(self, fn: Runner, inner: int) -> float:
        """Seconds per call over ``inner`` back-to-back calls. CUDA backends override this."""
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner

    def measure(
        self,
        runners: Sequence[Runner],
        rivals: Sequence[Sequence[int]] | None = None,
        on_round: Callable[[int], None] | None = None,
        policy: TimingPolicy | None = None,
        bounds: Sequence[float] | None = None,
    ) -> list[Timing]:
        """Time ``runners`` interleaved, round by round, under this backend's policy.

        ``rivals[i]`` lists the runners that runner ``i`` competes with (e.g. other formats
        for the same level); ``i`` stops early once its median exceeds ``race_ratio`` times
        the best rival's (both with at least ``race_after`` samples) or ``bounds[i]`` (the
        time of a rival measured before).
        """
        if not runners:
            return []
        with self.timing_context():
            return self._measure(runners, rivals, on_round, policy or self.policy, bounds)

    def _measure(
        self,
        runners: Sequence[Runner],
        rivals: Sequence[Sequence[int]] | None,
        on_round: Callable[[int], None] | None,
        p: TimingPolicy,
        bounds: Sequence[float] | None = None,
    ) -> list[Timing]:
        n = len(runners)
        monitor = self._monitor
        inner = self._inner_calls(runners, p)
        race = _Race(n)
        rounds = 0
        watch = monitor.available and math.isfinite(p.max_others) and self.stats["busy_wait_s"] < p.patience_s
        window = monitor.snapshot() if watch else None
        order = np.random.default_rng(0) if p.shuffle else None
        while not all(race.done):
            for i in (order.permutation(n) if order is not None else range(n)):
                if not race.done[i]:
                    if p.block_calls > 1:
                        self._sample(runners[i], 1)  # untimed: it runs in the caches the previous runner left
                    race.pending[i] += [self._sample(runners[i], inner[i]) for _ in range(p.block_calls)]
            rounds += 1
            if window is not None:
                now = monitor.snapshot()
                if now[2] - window[2] < p.window_s:
                    continue  # judge a window once it is long enough for 10 ms jiffies to mean something
                if monitor.others_share(window, now) > p.max_others:
                    window = self._wait_for_quiet(race, window, now, p)
                    continue
                window = monitor.snapshot()
            self.stats["samples"] += race.commit(inner)
            for i in range(n):
                if not race.done[i]:
                    race.judge(i, inner[i], p, rivals, bounds)
            if p.lockstep and not all(race.done):
                race.done = list(race.dropped)  # all sample on until every one is done
            if on_round is not None:
                on_round(rounds)
        self.stats["discarded"] += sum(race.discarded)
        return [Timing.from_samples(race.samples[i], inner[i], race.dropped[i], race.discarded[i]) for i in range(n)]

    def _inner_calls(self, runners: Sequence[Runner], p: TimingPolicy) -> list[int]:
        """Calls per sample of each runner (after its warm-up): enough for ``p.min_sample_s``, at most 1000."""
        inner = [1] * len(runners)
        for i, fn in enumerate(runners):
            t = 0.0
            for _ in range(max(p.warmup_calls, 1)):
                t = self._sample(fn, 1)
            if p.min_sample_s > 0 and t < p.min_sample_s:
                inner[i] = max(1, min(1000, math.ceil(p.min_sample_s / max(t, 1e-7))))
        return inner

    def _wait_for_quiet(self, race: _Race, window: Any, now: Any, p: TimingPolicy) -> Any:
        """Another process took CPU time in this window, so its samples did not time us alone:
        discard them and let the other process run (rather than fight it) until the CPUs are
        quiet or the policy's patience is spent. Returns the next window, or None once the
        patience is spent (timing then goes on without watching)."""
        race.discard_pending()
        self.stats["busy_wait_s"] += now[2] - window[2]
        while self.stats["busy_wait_s"] < p.patience_s:
            t_wait = time.perf_counter()
            quiet = self._monitor.others_busy(p.busy_sleep_s) <= p.max_others
            self.stats["busy_wait_s"] += time.perf_counter() - t_wait
            if quiet:
                break
        if self.stats["busy_wait_s"] < p.patience_s:
            return self._monitor.snapshot()
        self.stats["busy_giveups"] += 1
        log.warning("other processes have kept the CPUs busy for %.0f s of this backend's timing; it "
                    "goes on without discarding disturbed samples (expect slow, noisy results; re-run "
                    "on a quiet machine)", self.stats["busy_wait_s"])
        return None

    # ----------------------------------------------------------------- layer and model timing

    def time_layer_levels(
        self,
        spec: LayerSpec,
        weight: np.ndarray,
        bias: np.ndarray | None,
        sparsities: Sequence[float],
        x: np.ndarray | None = None,
        allowed: Sequence[Sequence[str]] | None = None,
        patterns: Sequence[str] = (),
    ) -> list[LevelTiming]:
        """Time one layer at every sparsity in every format, all runners interleaved (one pass).

        ``weight`` is the layer's dense weight; each level magnitude-prunes it. The dense
        kernel is timed once when its speed does not depend on the zeros
        (:meth:`dense_time_is_level_independent`). ``allowed[i]`` restricts the formats
        tried at level ``i`` (default: :meth:`layer_formats`). The fastest format wins.

        ``patterns`` (``"2:4"``, ...) append one entry each after the levels: the weight
        magnitude-pruned to the N:M pattern, in the formats of :meth:`pattern_formats` and
        dense. A pattern without a kernel for this layer gets an entry with format
        :data:`NO_KERNEL` and time ``+inf``.
        """
        w = np.ascontiguousarray(weight, dtype=np.float32)
        b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        if tuple(w.shape) != tuple(spec.weight_shape):
            raise InvalidInputError(f"layer {spec.name!r}: weight has shape {w.shape}; the spec says {spec.weight_shape}")
        entries, has_kernel = self._level_entries(spec, sparsities, patterns)
        runners, keys = self._level_runners(spec, w, b, x, entries, has_kernel, allowed)
        timings = self._time_by_pool(runners, keys)
        del runners
        overhead = self.layer_call_overhead_s()
        shared_dense = (-1, DENSE) in keys
        out: list[LevelTiming] = []
        for li, (s, _pat) in enumerate(entries):
            if not has_kernel[li]:
                out.append(_no_kernel(s))
                continue
            cands = {f: timings[i] for i, (lj, f) in enumerate(keys) if lj == li}
            if shared_dense:
                cands[DENSE] = timings[keys.index((-1, DENSE))]
            out.append(_fastest(float(s), cands, overhead))
        return out

    def _level_entries(
        self, spec: LayerSpec, sparsities: Sequence[float], patterns: Sequence[str]
    ) -> tuple[list[tuple[float, Any]], list[bool]]:
        """The entries :meth:`time_layer_levels` times: ``(sparsity, None)`` per level, then
        ``(sparsity, NMPattern)`` per pattern; and whether the backend has a kernel for each."""
        from spdy.choices import parse_pattern

        nm = [parse_pattern(p) for p in patterns]
        entries: list[tuple[float, Any]] = [(float(s), None) for s in sparsities] + [(p.sparsity, p) for p in nm]
        has_kernel = [True] * len(sparsities) + [bool(self.pattern_formats(spec, p.name)) and p.fits(spec.matrix_shape[1])
                                                  for p in nm]
        return entries, has_kernel

    def _level_runners(
        self, spec: LayerSpec, w: np.ndarray, b: np.ndarray | None, x: np.ndarray | None,
        entries: list[tuple[float, Any]], has_kernel: list[bool], allowed: Sequence[Sequence[str]] | None,
    ) -> tuple[list[Runner], list[tuple[int, str]]]:
        """A runner per entry and format, keyed ``(entry index, format)``; the dense runner is one,
        keyed ``(-1, DENSE)``, when its speed does not depend on the zeros."""
        from spdy.profilers.pruning import LevelPruner, prune_n_m

        pruner = LevelPruner(w)
        runners: list[Runner] = []
        keys: list[tuple[int, str]] = []
        shared_dense = self.dense_time_is_level_independent()
        if shared_dense:
            runners.append(self.layer_runner(spec, LayerChoice(DENSE, w, b, 0.0), x))
            keys.append((-1, DENSE))
        for li, (s, pat) in enumerate(entries):
            if not has_kernel[li]:
                continue
            if allowed is not None:
                fmts = tuple(allowed[li])
            elif pat is None:
                fmts = self.layer_formats(spec, s)
            else:
                fmts = (DENSE, *self.pattern_formats(spec, pat.name))
            todo = [f for f in fmts if not (f == DENSE and shared_dense)]
            if not todo:
                continue
            wp = pruner.at(s) if pat is None else prune_n_m(w, s, pat.n, pat.m)
            for f in todo:
                runner = self._runner_if_it_runs(spec, LayerChoice(f, wp, b, float(s)), x)
                if runner is not None:
                    runners.append(runner)
                    keys.append((li, f))
        return runners, keys

    def _runner_if_it_runs(self, spec: LayerSpec, choice: LayerChoice, x: np.ndarray | None) -> Runner | None:
        """The layer's runner in ``choice.fmt``; None (warned once per kind) for a sparse format the
        runtime fails to run here. The dense format, and errors of the input, always raise."""
        if choice.fmt == DENSE:
            return self.layer_runner(spec, choice, x)
        try:
            runner = self.layer_runner(spec, choice, x)
            runner()
        except (InvalidInputError, ValueError, TypeError):
            raise  # our mistake or the caller's: say so
        except Exception as exc:  # runtime errors from torch/ORT kernels (e.g. unsupported dtype)
            key = (self.name, spec.kind, choice.fmt, type(exc).__name__)
            if key not in _SKIP_WARNED:
                _SKIP_WARNED.add(key)
                log.warning("%s: format %r fails for layer %s (%s: %s); it is skipped", self.name, choice.fmt,
                            spec.name, type(exc).__name__, str(exc).splitlines()[0][:200])
            return None
        return runner

    def _time_by_pool(self, runners: list[Runner], keys: list[tuple[int, str]]) -> list[Timing]:
        """Time a layer's runners. Rivals: the other formats of the same entry, and the shared
        dense runner. Runners of different thread pools are timed apart (:meth:`pool_of`), each
        group after the previous one's idle workers stopped spinning; earlier groups' results
        bound the later groups' races."""
        by_level: dict[int, list[int]] = {}
        for i, (li, _) in enumerate(keys):
            by_level.setdefault(li, []).append(i)
        pools: dict[str, list[int]] = {}
        for i, (_, f) in enumerate(keys):
            pools.setdefault(self.pool_of(f), []).append(i)
        timings: list[Timing | None] = [None] * len(runners)
        for gi, members in enumerate(sorted(pools.values(), key=lambda m: min(m))):
            if gi:
                time.sleep(self.pool_rest_s)
            pos = {i: k for k, i in enumerate(members)}
            rivals, bounds = [], []
            for i in members:
                li = keys[i][0]
                same = [] if li == -1 else [j for j in by_level[li] + by_level.get(-1, []) if j != i]
                rivals.append([pos[j] for j in same if j in pos])
                done_rivals = [timings[j].median_s for j in same if timings[j] is not None]  # type: ignore[union-attr]
                bounds.append(min(done_rivals, default=math.inf))
            got = self.measure([runners[i] for i in members], rivals, bounds=bounds)
            for i, t in zip(members, got):
                timings[i] = t
        return timings  # type: ignore[return-value]


    def time_models(self, bundle: Any, plans: Sequence[Mapping[str, LayerChoice]],
                    extra: Sequence[Runner] = (), blocks: bool = False) -> list[Timing]:
        """End-to-end times of several variants of ``bundle``'s model, interleaved (and of the
        ``extra`` runners, which must run in this backend's thread pool, after them); ``blocks``:
        each turn a block of calls in a row (:meth:`TimingPolicy.for_models`)."""
        runners = [self.model_runner(bundle, plan) for plan in plans] + list(extra)
        return self.measure(runners, policy=self.policy.for_models(blocks))

    def time_model(self, bundle: Any, plan: Mapping[str, LayerChoice]) -> Timing:
        """End-to-end time of ``bundle``'s model with its layers run as ``plan`` says."""
        return self.time_models(bundle, [plan])[0]


_SKIP_WARNED: set[tuple[str, str, str, str]] = set()


class _Race:
    """The samples of runners timed together (:meth:`Backend.measure`), and which are done.

    A round's samples wait in ``pending`` until the CPU monitor has judged their window;
    :meth:`commit` keeps them, :meth:`discard_pending` drops them.
    """

    def __init__(self, n: int) -> None:
        self.samples: list[list[float]] = [[] for _ in range(n)]
        self.pending: list[list[float]] = [[] for _ in range(n)]
        self.discarded = [0] * n
        self.spent = [0.0] * n
        self.done = [False] * n
        self.dropped = [False] * n

    def commit(self, inner: Sequence[int]) -> int:
        """Keep the pending samples; returns how many."""
        kept = 0
        for i, pend in enumerate(self.pending):
            if pend:
                self.samples[i] += pend
                self.spent[i] += sum(pend) * inner[i]
                kept += len(pend)
                pend.clear()
        return kept

    def discard_pending(self) -> None:
        for i, pend in enumerate(self.pending):
            self.discarded[i] += len(pend)
            pend.clear()

    def judge(self, i: int, inner: int, p: TimingPolicy, rivals: Sequence[Sequence[int]] | None,
              bounds: Sequence[float] | None) -> None:
        """Runner ``i`` is done once it has enough samples (``max_repeats``, ``max_seconds``) or a
        tight enough interval (``target_ci``); it is dropped once its median exceeds ``race_ratio``
        times the best rival's or its bound."""
        k = len(self.samples[i])
        if k >= p.max_repeats or (self.spent[i] >= p.max_seconds and k >= p.min_samples):
            self.done[i] = True
            return
        if k >= p.min_repeats and Timing.from_samples(self.samples[i], inner).ci <= p.target_ci:
            self.done[i] = True
            return
        if k >= p.race_after and math.isfinite(p.race_ratio) and ((rivals and rivals[i]) or bounds):
            best = min(
                (float(np.median(self.samples[j])) for j in (rivals[i] if rivals else ())
                 if len(self.samples[j]) >= p.race_after),
                default=math.inf,
            )
            if bounds:
                best = min(best, bounds[i])
            if float(np.median(self.samples[i])) > p.race_ratio * best:
                self.done[i] = self.dropped[i] = True


def _no_kernel(sparsity: float) -> LevelTiming:
    return LevelTiming(float(sparsity), NO_KERNEL, math.inf, math.nan, {})


#: How much slower (in the loop) a format that runs on the calling thread alone may be and
#: still be preferred to a multi-threaded one (:func:`format_rank`).
SERIAL_PREFERENCE = 0.05
#: The suffix of the formats that run on the calling thread alone (``spdy.kernels.linear.SERIAL``).
SERIAL_SUFFIX = "-1t"


def format_rank(fmt: str, seconds: float) -> tuple[float, bool]:
    """Sort key of a kernel format timed at ``seconds``: the fastest first, dense on a tie.

    A serial format (:data:`SERIAL_SUFFIX`) counts :data:`SERIAL_PREFERENCE` faster than
    it was timed. On a loaded machine a thread team waits for its slowest thread at every
    call, so a short multi-threaded kernel loses more than its serial twin; where the loop
    times are close, the serial one is the better bet inside the model. The time recorded
    for the format chosen is its own, undiscounted.
    """
    return (seconds * (1.0 - SERIAL_PREFERENCE) if fmt.endswith(SERIAL_SUFFIX) else seconds, fmt != DENSE)


def _fastest(sparsity: float, cands: dict[str, Timing], overhead: float = 0.0) -> LevelTiming:
    fmt = min(cands, key=lambda f: format_rank(f, cands[f].median_s))
    t = max(cands[fmt].median_s - overhead, 0.0)
    return LevelTiming(sparsity, fmt, t, cands[fmt].spread, dict(cands))



# --------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend available to :func:`spdy.profilers.get_backend` under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls

"""The dense runtimes a user would deploy instead of a pruned model: torch eager, torch.compile and ONNX Runtime.

A backend's own unpruned plan (level 0 of the profile, each layer in the fastest format
found for it; on ``spdy-cpu`` that can be a sparse kernel on the unpruned weight) is what
the latency table predicts against, but not what a user compares with. :func:`dense_runtimes`
builds a runner of the dense model in

* ``torch``: torch eager, the model as it is timed (its inference form: BatchNorms
  folded, as ONNX Runtime folds them too) with torch's own ``nn.Linear``/``nn.Conv2d``, on
  the backend's device and dtype and with its thread count;
* ``torch_channels_last``: torch eager with the model and its input in the ``channels_last``
  memory format (NHWC, what oneDNN's convolutions prefer on the CPU); only for a model with
  convolutions that takes one 4-D image batch, and not listed at all for others;
* ``torch_compile``: the same torch model compiled by ``torch.compile`` (Inductor's C++
  backend, static shapes), on the CPU only; it compiles when the runner is made (seconds;
  on the digits-sized test models about one);
* ``onnxruntime``: the same model exported to ONNX and run by ONNX Runtime's CPU provider
  (graph optimisations ``all``, the backend's thread count, one session with its own pool).

A model torch.compile or ONNX Runtime cannot compile, export or run (or whose output there
is not torch eager's) leaves that runtime out, with the reason in :attr:`DenseRuntimes.unavailable`.

:func:`time_with_runtimes` times a backend's plans and these runners together, round by
round. A runner of another thread pool than the backend's (ONNX Runtime's pool next to
torch's and Numba's OpenMP pool, or torch next to ``ort-cpu``) never runs call by call
between the backend's runners: idle workers of one pool would spin while the other pool
works (:meth:`Backend.pool_of`). It is timed in a block of its own, between the backend's
blocks, after ``pool_rest_s``; the blocks alternate order from round to round, so that
each round's ratio of the two is taken seconds apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from spdy.errors import SpdyError
from spdy.profilers.base import Backend, LayerChoice, Runner, Timing, as_numpy

log = logging.getLogger(__name__)

TORCH = "torch"
TORCH_CHANNELS_LAST = "torch_channels_last"
TORCH_COMPILE = "torch_compile"
ONNXRUNTIME = "onnxruntime"
#: the backend's own unpruned plan (what the latency table predicts against)
DENSE_PLAN = "dense_plan"
#: the dense runtimes a user could deploy instead, in the order they are reported
RUNTIMES = (TORCH, TORCH_CHANNELS_LAST, TORCH_COMPILE, ONNXRUNTIME)
#: ONNX Runtime's dense model on one thread, next to a backend of several: never a reference, it
#: reads the machine's state (:meth:`spdy.results.Outcome.speedups_by_state`)
STATE_PROBE = "onnxruntime_1t"
LABELS = {TORCH: "torch eager", TORCH_CHANNELS_LAST: "torch eager channels_last", TORCH_COMPILE: "torch.compile",
          ONNXRUNTIME: "ONNX Runtime", DENSE_PLAN: "dense plan", STATE_PROBE: "ONNX Runtime on 1 thread"}
#: ONNX Runtime's output may differ from torch's by this much (relative to the largest output value)
OUTPUT_RTOL = 1e-2


@dataclass(frozen=True)
class DenseRuntime:
    """One dense runtime's runner. ``timer`` is None when it runs in the backend's own thread
    pool (timed interleaved with the backend's plans), else the backend that times it apart."""

    name: str
    runner: Runner
    timer: Backend | None = None


@dataclass(frozen=True)
class DenseRuntimes:
    """The dense runtimes that run a model here, and why the others do not."""

    runtimes: Mapping[str, DenseRuntime] = field(default_factory=dict)
    unavailable: Mapping[str, str] = field(default_factory=dict)


def dense_runtimes(backend: Backend, bundle: Any, state_probe: bool = True) -> DenseRuntimes:
    """Runners of ``bundle``'s dense model in torch eager, torch.compile and ONNX Runtime, next to ``backend``.

    With ``state_probe`` and a backend of two threads or more, also ONNX Runtime on one thread
    (:data:`STATE_PROBE`, timed apart like ONNX Runtime): its time over ONNX Runtime's on the
    backend's threads in the same round is that round's gain from the extra threads, which
    tells the machine's states apart (:meth:`spdy.results.Outcome.speedups_by_state`). It is never a
    reference.

    ``bundle`` is the model as the backend times it (:attr:`~spdy.models.base.ModelBundle.inference`).
    Torch eager always runs; torch.compile and ONNX Runtime are left out, with the reason, when
    the backend is not on the CPU (torch.compile: not in float32), when onnx/onnxruntime are
    missing, or when the model does not compile, export or run there or gives another output.
    """
    from spdy.profilers.torch_backends import TorchCpuBackend, TorchRuntimeBackend

    runtimes: dict[str, DenseRuntime] = {}
    unavailable: dict[str, str] = {}
    if isinstance(backend, TorchRuntimeBackend):
        runtimes[TORCH] = DenseRuntime(TORCH, backend.model_runner(bundle, {}))  # no layer swapped: torch's own
    else:
        tb = TorchCpuBackend(threads=backend.threads, policy=backend.policy)
        runtimes[TORCH] = DenseRuntime(TORCH, tb.model_runner(bundle, {}), tb)
    if _is_cnn(backend, bundle):
        try:
            runtimes[TORCH_CHANNELS_LAST] = _torch_channels_last(bundle, runtimes[TORCH])
        except _Unavailable as exc:
            unavailable[TORCH_CHANNELS_LAST] = str(exc)
    try:
        runtimes[TORCH_COMPILE] = _torch_compile(backend, bundle, runtimes[TORCH])
    except _Unavailable as exc:
        unavailable[TORCH_COMPILE] = str(exc)
        log.info("torch.compile is not measured as a dense reference for %s: %s", getattr(bundle, "name", "the model"), exc)
    try:
        runtimes[ONNXRUNTIME] = _onnxruntime(backend, bundle, runtimes[TORCH].runner)
    except _Unavailable as exc:
        unavailable[ONNXRUNTIME] = str(exc)
        log.info("ONNX Runtime is not measured as a dense reference for %s: %s", getattr(bundle, "name", "the model"), exc)
    ort = runtimes.get(ONNXRUNTIME)
    if state_probe and ort is not None and ort.timer is not None and backend.threads >= 2:
        try:
            runtimes[STATE_PROBE] = _one_thread_onnxruntime(backend, bundle)
        except Exception as exc:  # ONNX Runtime's global pool of another size in this process, its own errors
            log.info("ONNX Runtime on one thread is not timed next to %s (%s): the rounds' states are not read",
                     backend.name, _why(exc))
    return DenseRuntimes(runtimes, unavailable)


#: Samples per round of ONNX Runtime on one thread (:data:`STATE_PROBE`): its time does not move
#: with the state it reads, and the two states' gains differ by a quarter, so a few calls do.
PROBE_REPEATS = 6


def _one_thread_onnxruntime(backend: Backend, bundle: Any) -> DenseRuntime:
    from spdy.profilers.ort_cpu import OrtCpuBackend

    p = backend.policy
    reps = max(p.min_samples, PROBE_REPEATS)
    one = OrtCpuBackend(threads=1, shared_pool=False,
                        policy=replace(p, min_repeats=reps, model_min_repeats=reps, max_repeats=2 * reps))
    return DenseRuntime(STATE_PROBE, one.dense_runner(bundle), one)


class _Unavailable(Exception):
    """Why a dense runtime cannot run the model (internal: becomes an entry of ``unavailable``)."""


def _why(exc: Exception) -> str:
    """An exception's type and the first line of its message (a runtime's errors run long)."""
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def _cpu_float32(backend: Backend) -> bool:
    return getattr(backend, "device", "cpu") == "cpu" and getattr(backend, "dtype_name", "float32") == "float32"


def _dense_copy(bundle: Any) -> Any:
    """A float32 inference copy of ``bundle``'s model for a torch dense runtime of its own, sharing
    the model's weights where it is float32 on the CPU already
    (:func:`~spdy.profilers.torch_backends.inference_copy`): the weights a user's torch.compile reads."""
    from spdy.profilers.torch_backends import inference_copy

    return inference_copy(bundle.model)


def _is_cnn(backend: Backend, bundle: Any) -> bool:
    """A model with convolutions that takes one 4-D image batch, timed on the CPU in float32."""
    import torch

    return (_cpu_float32(backend) and isinstance(bundle.example, torch.Tensor) and bundle.example.dim() == 4
            and any(isinstance(m, torch.nn.Conv2d) for m in bundle.model.modules()))


def _torch_channels_last(bundle: Any, eager: DenseRuntime) -> DenseRuntime:
    import torch

    model = _dense_copy(bundle).to(memory_format=torch.channels_last)
    ex = bundle.example.float().contiguous(memory_format=torch.channels_last)
    fwd = bundle.forward

    def run() -> Any:
        with torch.inference_mode():
            return fwd(model, ex)

    try:
        got = as_numpy(run())
    except Exception as exc:  # an op without a channels_last kernel, a layout the model cannot take
        raise _Unavailable(f"the model does not run in channels_last ({_why(exc)})") from None
    _check_same_output(got, as_numpy(eager.runner()), "torch eager in channels_last")
    return DenseRuntime(TORCH_CHANNELS_LAST, run, eager.timer)


def _torch_compile(backend: Backend, bundle: Any, eager: DenseRuntime) -> DenseRuntime:
    import torch

    from spdy.profilers.torch_backends import move_batch

    if not _cpu_float32(backend):
        raise _Unavailable("measured as a dense reference on the CPU in float32 only")
    model = _dense_copy(bundle)
    ex = move_batch(bundle.example, "cpu", torch.float32)
    fwd = bundle.forward
    try:
        compiled = torch.compile(model, dynamic=False)

        def run() -> Any:
            with torch.inference_mode():
                return fwd(compiled, ex)

        got = as_numpy(run())  # compiles here, not in a timing
    except Exception as exc:  # the compiler's own errors (unsupported op, C++ build)
        raise _Unavailable(f"torch.compile cannot compile the model ({_why(exc)})") from None
    _check_same_output(got, as_numpy(eager.runner()), "torch.compile")
    return DenseRuntime(TORCH_COMPILE, run, eager.timer)


def _check_same_output(got: np.ndarray, want: np.ndarray, label: str) -> None:
    if got.shape != want.shape:
        raise _Unavailable(f"{label}'s output has shape {got.shape}, torch's {want.shape}")
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-6)
    off = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
    if not off <= OUTPUT_RTOL:
        raise _Unavailable(f"{label}'s output differs from torch's by {off:.2g} of its largest value: it does "
                           "not compute the same model")


def _onnxruntime(backend: Backend, bundle: Any, torch_runner: Runner) -> DenseRuntime:
    from spdy.profilers.ort_cpu import OrtCpuBackend

    if getattr(backend, "device", "cpu") != "cpu":
        raise _Unavailable(f"the {backend.name} backend runs on {backend.device}; ONNX Runtime's CPU provider is "
                           "no reference for it")
    reason = OrtCpuBackend.unavailable_reason()
    if reason:
        raise _Unavailable(reason)
    try:
        if isinstance(backend, OrtCpuBackend):
            ort, timer = backend, None
        else:  # one session, its own pool (or the process's global one, where an ort-cpu backend made it)
            ort = timer = OrtCpuBackend(threads=backend.threads, policy=backend.policy, shared_pool=False)
        runner = ort.dense_runner(bundle)
        got = as_numpy(runner())
    except SpdyError as exc:
        raise _Unavailable(str(exc)) from None
    except Exception as exc:  # ONNX Runtime's own errors (unsupported op, type, shape)
        raise _Unavailable(f"ONNX Runtime cannot run the exported model ({_why(exc)})") from None
    _check_same_output(got, as_numpy(torch_runner()), "ONNX Runtime")
    return DenseRuntime(ONNXRUNTIME, runner, timer)


def time_with_runtimes(
    backend: Backend,
    bundle: Any,
    plans: Sequence[Mapping[str, LayerChoice]],
    runtimes: DenseRuntimes | None,
    rounds: int = 1,
    blocks: bool = False,
) -> tuple[list[list[Timing]], list[dict[str, Timing]]]:
    """``rounds`` rounds, each timing ``bundle``'s model under every plan (interleaved, as
    :meth:`Backend.time_models`) and each dense runtime of ``runtimes``: those of the
    backend's pool interleaved with the plans, the others in a block of their own next to
    the plans' block (see the module docstring). ``blocks``: every model's turn is a block of
    calls in a row (:meth:`~spdy.profilers.TimingPolicy.for_models`). Returns per round the
    plans' timings and ``{runtime: timing}``."""
    same = [r for r in (runtimes.runtimes.values() if runtimes else ()) if r.timer is None]
    apart = [r for r in (runtimes.runtimes.values() if runtimes else ()) if r.timer is not None]
    out_plans: list[list[Timing]] = []
    out_runtimes: list[dict[str, Timing]] = []
    for i in range(max(1, rounds)):
        got: dict[str, Timing] = {}
        if apart and i % 2:
            got.update(_time_apart(backend, apart, blocks))
        timings = backend.time_models(bundle, plans, extra=[r.runner for r in same], blocks=blocks)
        if apart and not i % 2:
            got.update(_time_apart(backend, apart, blocks))
        got.update({r.name: t for r, t in zip(same, timings[len(plans):])})
        out_plans.append(list(timings[:len(plans)]))
        out_runtimes.append({n: got[n] for n in (*RUNTIMES, STATE_PROBE) if n in got})
    return out_plans, out_runtimes


def _time_apart(backend: Backend, apart: Sequence[DenseRuntime], blocks: bool = False) -> dict[str, Timing]:
    """The runtimes of other pools, each alone, after the previous pool's idle workers stopped spinning."""
    got = {}
    for r in apart:
        assert r.timer is not None
        time.sleep(backend.pool_rest_s)
        got[r.name] = r.timer.measure([r.runner], policy=r.timer.policy.for_models(blocks))[0]
    time.sleep(backend.pool_rest_s)
    return got

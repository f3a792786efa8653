"""``ort-cpu``: ONNX Runtime's CPU execution provider.

Per level, the faster of the dense op (MatMul, which ORT fuses with the bias Add into a
Gemm; Conv for Conv2d) and ``com.microsoft.SparseToDenseMatMul`` with the weight as a
COO sparse tensor fed at run time (the op rejects sparse initializers, which ORT
densifies at load). Both are timed at every level and the faster one is kept, so the
sparse op appears in a profile only at the (very high) sparsities where it beats the
dense Gemm. Conv2d layers run dense only (ORT has no sparse convolution).

All sessions share ONNX Runtime's global thread pool, sized once per process to the
backend's thread count, so that only one pool ever spins (a layer's formats are timed
interleaved, one session each: with a pool per session, idle pools would spin while
another session runs). Once that pool exists, every ORT session in the process must
set ``use_per_session_threads = False`` (use :meth:`OrtCpuBackend.session_options`);
``shared_pool=False`` keeps ORT usable for other code in the process (e.g. test
suites), at the price of one pool per session. Every session uses the same
options (graph optimisation level ``all``, as deployments do). A layer alone runs in its
own one-layer session; the fixed cost of a ``Run`` call (measured on an empty graph) is
subtracted from layer times, because inside the model a layer pays no such cost.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from spdy.errors import InvalidInputError
from spdy.profilers.base import DENSE, STANDIN, Backend, LayerChoice, Runner, register
from spdy.profilers.onnx_graph import COO, ExportedModel, export_dense, export_model, output_shape, rewrite_model, single_layer_model
from spdy.types import LayerSpec

log = logging.getLogger(__name__)

_GLOBAL_POOL_THREADS: int | None = None  # None: not tried; -1: ORT's environment existed already


def _global_pool(threads: int) -> bool:
    """Size ORT's global thread pool (once per process). False if ORT was already in use without one.

    Once the global pool exists, every session in the process must use it; a second
    backend with another thread count cannot have its own pool, so that is refused.
    """
    global _GLOBAL_POOL_THREADS
    if _GLOBAL_POOL_THREADS is None:
        import onnxruntime.capi._pybind_state as C

        try:
            C.set_global_thread_pool_sizes(threads, 1)
        except Exception as exc:  # the environment already exists
            log.warning("cannot create ONNX Runtime's global thread pool (ORT was used before in this process: %s); "
                        "each session gets its own pool", exc)
            _GLOBAL_POOL_THREADS = -1
            return False
        _GLOBAL_POOL_THREADS = threads
    if _GLOBAL_POOL_THREADS == -1:
        return False
    if _GLOBAL_POOL_THREADS != threads:
        raise InvalidInputError(
            f"ONNX Runtime's global thread pool in this process has {_GLOBAL_POOL_THREADS} threads; an ort-cpu "
            f"backend with {threads} threads needs a new process (or pass threads={_GLOBAL_POOL_THREADS})"
        )
    return True


def _ortvalue(arr: np.ndarray, keep: list[Any]) -> Any:
    """An OrtValue over ``arr``'s memory (no copy); ``arr`` is appended to ``keep``, which must outlive it."""
    import onnxruntime as ort

    arr = np.ascontiguousarray(arr)
    keep.append(arr)
    return ort.OrtValue.ortvalue_from_numpy(arr)


def sparse_ortvalue(w: np.ndarray, keep: list[Any]) -> Any:
    """A COO sparse OrtValue of the dense-with-zeros matrix ``w`` ((row, col) index pairs, row-major).

    On the CPU ORT points into the value and index arrays; they go to ``keep``, which must outlive it.
    """
    import onnxruntime as ort

    w = np.ascontiguousarray(w, dtype=np.float32)
    idx = np.ascontiguousarray(np.argwhere(w != 0).astype(np.int64))  # [nnz, 2]; the op wants 2-D indices
    vals = np.ascontiguousarray(w[w != 0])
    keep += [vals, idx]
    st = ort.SparseTensor.sparse_coo_from_numpy(list(w.shape), vals, idx, ort.OrtDevice.make("cpu", 0))
    keep.append(st)
    return ort.OrtValue.ort_value_from_sparse_tensor(st)


@register
class OrtCpuBackend(Backend):
    """ONNX Runtime CPU EP: dense MatMul/Gemm/Conv or ``SparseToDenseMatMul`` (COO) per level."""

    name = "ort-cpu"
    description = "ONNX Runtime CPU: dense MatMul/Gemm/Conv or com.microsoft.SparseToDenseMatMul (COO)"

    def __init__(self, threads: int | None = None, policy: Any = None, shared_pool: bool = True) -> None:
        self._want_shared_pool = bool(shared_pool)
        super().__init__(threads=threads, policy=policy)
        self._exports: "weakref.WeakKeyDictionary[Any, tuple[ExportedModel, dict[str, Any]]]" = weakref.WeakKeyDictionary()
        self._overhead_s: float | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"{exc.name} is not installed; run: pip install onnx onnxruntime"
        return None

    def _configure_threads(self) -> None:
        if self._want_shared_pool or (_GLOBAL_POOL_THREADS or -1) > 0:
            self._shared_pool = _global_pool(self.threads)
        else:
            self._shared_pool = False

    def session_options(self) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.use_per_session_threads = not self._shared_pool
        if not self._shared_pool:  # with the global pool ORT ignores (and warns about) these
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        return so

    def session(self, model: Any) -> Any:
        import onnxruntime as ort

        return ort.InferenceSession(model.SerializeToString(), self.session_options(), providers=["CPUExecutionProvider"])

    def runtime_fingerprint(self) -> dict[str, Any]:
        import onnx
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "ort_provider": "CPUExecutionProvider",
                "ort_thread_pool": "global" if self._shared_pool else "per-session", "ort_opt_level": "all"}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "dtype": "float32", "ort_run_overhead_s": self.run_overhead_s()}

    # ------------------------------------------------------------------ layers

    def layer_formats(self, spec: LayerSpec, sparsity: float) -> tuple[str, ...]:
        if spec.kind == "linear" and sparsity > 0:
            return (DENSE, COO)
        return (DENSE,)

    def _bound_runner(self, model: Any, feeds: Mapping[str, Any], out_name: str, out_shape: tuple[int, ...]) -> Runner:
        sess = self.session(model)
        binding = sess.io_binding()
        keep: list[Any] = []  # numpy buffers and OrtValues the binding points into
        for name, val in feeds.items():
            v = val if not isinstance(val, np.ndarray) else _ortvalue(val, keep)
            keep.append(v)
            binding.bind_ortvalue_input(name, v)
        out_buf = np.zeros(out_shape, np.float32)
        out = _ortvalue(out_buf, keep)
        binding.bind_ortvalue_output(out_name, out)
        run_with = sess.run_with_iobinding

        def run() -> np.ndarray:
            run_with(binding)
            return out_buf  # ORT wrote into it; the array keeps its memory alive

        run.session = sess  # type: ignore[attr-defined]
        run.keep = (keep, out, binding)  # type: ignore[attr-defined]  # buffers must outlive the binding
        return run

    def layer_runner(self, spec: LayerSpec, choice: LayerChoice, x: np.ndarray | None = None) -> Runner:
        if choice.weight is None:
            raise InvalidInputError(f"layer {spec.name!r}: format {choice.fmt!r} needs a weight")
        if x is None:
            x = np.random.default_rng(0).standard_normal(spec.input_shape).astype(np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if tuple(x.shape) != tuple(spec.input_shape):
            raise InvalidInputError(f"layer {spec.name!r}: input has shape {x.shape}; the spec says {spec.input_shape}")
        model, sparse = single_layer_model(spec, choice.fmt, choice.weight, choice.bias)
        keep: list[Any] = []
        feeds: dict[str, Any] = {"x": x, **{n: sparse_ortvalue(w, keep) for n, w in sparse.items()}}
        run = self._bound_runner(model, feeds, "y", output_shape(spec))
        run.sparse_buffers = keep  # type: ignore[attr-defined]
        return run

    def run_overhead_s(self) -> float:
        """The fixed cost of one bound ``Run`` call (an Identity on one float), measured once."""
        if self._overhead_s is None:
            from onnx import TensorProto, helper

            g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="id")], "empty",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
            run = self._bound_runner(m, {"x": np.zeros(1, np.float32)}, "y", (1,))
            self._overhead_s = self.measure([run])[0].median_s
        return self._overhead_s

    def layer_call_overhead_s(self) -> float:
        return self.run_overhead_s()

    # ------------------------------------------------------------------ models

    def _export(self, bundle: Any) -> tuple[ExportedModel, dict[str, Any]]:
        got = self._exports.get(bundle.model)
        if got is None:
            from spdy.profilers.torch_backends import capture_layer_io

            specs = bundle.layers()
            exported = export_model(bundle, specs)
            io = capture_layer_io(bundle.model, bundle.example, bundle.forward, [s.name for s in specs])
            outs = {n: v[1].float().numpy() for n, v in io.items()}
            got = (exported, {"specs": {s.name: s for s in specs}, "outputs": outs})
            self._exports[bundle.model] = got
        return got

    def dense_runner(self, bundle: Any) -> Runner:
        """``bundle``'s model exported as it is and run dense: what a user deploys in ONNX Runtime
        (no layer is located or rewritten, so any exportable single-output model runs)."""
        exported = export_dense(bundle)
        return self._bound_runner(exported.model, dict(exported.inputs), exported.output_name, exported.output_shape)

    def model_runner(self, bundle: Any, choices: Mapping[str, LayerChoice]) -> Runner:
        exported, info = self._export(bundle)
        outs = info["outputs"]
        model, sparse, standin_inputs = rewrite_model(
            exported, info["specs"], choices, {n: outs[n].shape for n, c in choices.items() if c.fmt == STANDIN}
        )
        feeds: dict[str, Any] = dict(exported.inputs)
        for layer, name in standin_inputs.items():
            feeds[name] = outs[layer]
        keep: list[Any] = []
        feeds.update({n: sparse_ortvalue(w, keep) for n, w in sparse.items()})
        run = self._bound_runner(model, feeds, exported.output_name, exported.output_shape)
        run.sparse_buffers = keep  # type: ignore[attr-defined]
        return run

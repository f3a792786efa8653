"""ONNX graphs for the ``ort-cpu`` backend: one layer alone, or the whole model with each
prunable layer rewritten to a chosen op (dense MatMul/Conv, ``SparseToDenseMatMul``) or
replaced by a graph input (the zero-cost stand-in used for the base time).

The same :func:`layer_nodes` builds a layer in both places, so the layer that is timed
alone is exactly the layer that runs in the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from spdy.errors import InvalidInputError, ModelLoadError
from spdy.types import LayerSpec

log = logging.getLogger(__name__)

OPSET = 17
MS_DOMAIN = "com.microsoft"
COO = "coo"


def output_shape(spec: LayerSpec) -> tuple[int, ...]:
    """The layer's output shape on its input shape."""
    if spec.kind == "linear":
        return (*spec.input_shape[:-1], spec.weight_shape[0])
    n, _, h, w = spec.input_shape
    out_c, _, kh, kw = spec.weight_shape
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return (n, out_c, oh, ow)


@dataclass
class LayerGraph:
    """Nodes and initializers computing one layer from tensor ``x`` into tensor ``y``.

    ``sparse_inputs`` maps graph-input names to sparse weights (numpy dense arrays with
    zeros) that must be fed at run time: ``SparseToDenseMatMul`` only accepts its sparse
    operand as a run-time input (a sparse initializer is densified at load).
    """

    nodes: list[Any]
    initializers: list[Any]
    sparse_inputs: dict[str, np.ndarray]


def layer_nodes(spec: LayerSpec, fmt: str, x: str, y: str, tag: str, weight: np.ndarray,
                bias: np.ndarray | None) -> LayerGraph:
    """The ops of one layer in format ``fmt`` (``dense`` or ``coo``); names prefixed by ``tag``."""
    from onnx import helper, numpy_helper

    w = np.ascontiguousarray(weight, dtype=np.float32)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    nodes, inits, sparse = [], [], {}
    if spec.kind == "conv2d":
        if fmt != "dense":
            raise InvalidInputError(f"ort-cpu runs Conv2d layers dense only; got format {fmt!r} for {spec.name!r}")
        inits.append(numpy_helper.from_array(w, f"{tag}/W"))
        ins = [x, f"{tag}/W"]
        if b is not None:
            inits.append(numpy_helper.from_array(b, f"{tag}/B"))
            ins.append(f"{tag}/B")
        ph, pw = spec.padding
        nodes.append(helper.make_node("Conv", ins, [y], name=f"{tag}/Conv", strides=list(spec.stride),
                                      pads=[ph, pw, ph, pw], dilations=list(spec.dilation)))
        return LayerGraph(nodes, inits, sparse)
    out_f, in_f = spec.weight_shape
    pre = y if b is None else f"{tag}/xw"
    if fmt == "dense":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{tag}/Wt"))
        nodes.append(helper.make_node("MatMul", [x, f"{tag}/Wt"], [pre], name=f"{tag}/MatMul"))
    elif fmt == COO:
        # y = x W^T = (W x^T)^T with W sparse on the left, as the op requires
        lead = tuple(spec.input_shape[:-1])
        rows = int(np.prod(lead)) if lead else 1
        inits += [numpy_helper.from_array(np.array([rows, in_f], np.int64), f"{tag}/shape2d"),
                  numpy_helper.from_array(np.array([*lead, out_f], np.int64), f"{tag}/shape_out")]
        sparse[f"{tag}/W_sparse"] = w
        nodes += [
            helper.make_node("Reshape", [x, f"{tag}/shape2d"], [f"{tag}/x2"], name=f"{tag}/Reshape_in"),
            helper.make_node("Transpose", [f"{tag}/x2"], [f"{tag}/xt"], name=f"{tag}/Transpose_in", perm=[1, 0]),
            helper.make_node("SparseToDenseMatMul", [f"{tag}/W_sparse", f"{tag}/xt"], [f"{tag}/yt"],
                             name=f"{tag}/SparseToDenseMatMul", domain=MS_DOMAIN),
            helper.make_node("Transpose", [f"{tag}/yt"], [f"{tag}/y2"], name=f"{tag}/Transpose_out", perm=[1, 0]),
            helper.make_node("Reshape", [f"{tag}/y2", f"{tag}/shape_out"], [pre], name=f"{tag}/Reshape_out"),
        ]
    else:
        raise InvalidInputError(f"ort-cpu has no format {fmt!r}; expected 'dense' or {COO!r}")
    if b is not None:
        inits.append(numpy_helper.from_array(b, f"{tag}/B"))
        nodes.append(helper.make_node("Add", [pre, f"{tag}/B"], [y], name=f"{tag}/Add"))
    return LayerGraph(nodes, inits, sparse)


def _opsets() -> list[Any]:
    from onnx import helper

    return [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]


def single_layer_model(spec: LayerSpec, fmt: str, weight: np.ndarray, bias: np.ndarray | None) -> tuple[Any, dict[str, np.ndarray]]:
    """A model with input ``x`` of the layer's input shape and output ``y``; plus its sparse inputs."""
    from onnx import TensorProto, helper

    lg = layer_nodes(spec, fmt, "x", "y", "layer", weight, bias)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(spec.input_shape))]
    inputs += [helper.make_sparse_tensor_value_info(n, TensorProto.FLOAT, list(w.shape)) for n, w in lg.sparse_inputs.items()]
    g = helper.make_graph(lg.nodes, f"spdy_{spec.name}_{fmt}", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(output_shape(spec)))],
                          lg.initializers)
    return helper.make_model(g, opset_imports=_opsets()), lg.sparse_inputs


# --------------------------------------------------------------------- whole models


@dataclass
class LayerSite:
    """Where an exported layer sits in the graph: the nodes computing it, its input and output."""

    nodes: list[str]  # node names, in graph order
    x: str
    y: str
    initializers: list[str]  # weight and bias initializers only this layer uses


@dataclass
class ExportedModel:
    """The dense model exported once, with the site of each prunable layer."""

    model: Any  # onnx.ModelProto
    input_names: list[str]
    inputs: dict[str, np.ndarray]
    output_name: str
    output_shape: tuple[int, ...]
    sites: dict[str, LayerSite]


def _flatten_batch(batch: Any) -> tuple[list[str], list[Any], Any]:
    """Tensors of a batch with names, and a function rebuilding the batch from them."""
    import torch

    if isinstance(batch, torch.Tensor):
        return ["input"], [batch], lambda ts: ts[0]
    if isinstance(batch, Mapping):
        keys = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
        rest = {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)}
        return [str(k) for k in keys], [batch[k] for k in keys], lambda ts: {**rest, **dict(zip(keys, ts))}
    if isinstance(batch, (tuple, list)):
        idx = [i for i, v in enumerate(batch) if isinstance(v, torch.Tensor)]

        def rebuild(ts: list[Any]) -> Any:
            out = list(batch)
            for i, t in zip(idx, ts):
                out[i] = t
            return type(batch)(out)

        return [f"input_{i}" for i in idx], [batch[i] for i in idx], rebuild
    raise InvalidInputError(f"cannot export a model whose example batch is a {type(batch).__name__}")


def _key(arr: np.ndarray) -> tuple[tuple[int, ...], str]:
    a = np.ascontiguousarray(arr, dtype=np.float32)
    return tuple(a.shape), hashlib.sha1(a.tobytes()).hexdigest()


def export_model(bundle: Any, specs: list[LayerSpec]) -> ExportedModel:
    """Export ``bundle``'s model on its example batch (TorchScript exporter, opset 17) and locate each layer.

    Layers are found by their weight values (a MatMul/Gemm/Conv whose weight initializer
    equals the layer's weight or its transpose), then the bias Add that follows.
    """
    exported = export_dense(bundle)
    graph = _GraphIndex(exported.model.graph)
    sites = {spec.name: graph.site(bundle, spec) for spec in specs}
    for n in exported.model.graph.node:
        if not n.name:
            raise ModelLoadError("the exported graph has unnamed nodes; cannot rewrite it")
    return dataclasses.replace(exported, sites=sites)


def export_dense(bundle: Any) -> ExportedModel:
    """``bundle``'s model exported on its example batch as it is (no layer located): the dense
    model a user would run in ONNX Runtime. Raises :class:`~spdy.errors.ModelLoadError` when
    the exporter fails or the model's output is not one tensor."""
    import torch

    names, tensors, rebuild = _flatten_batch(bundle.example)
    with torch.inference_mode():
        out = bundle.forward(bundle.model, bundle.example)
    if not isinstance(out, torch.Tensor):
        raise ModelLoadError(f"model {bundle.name!r} returns a {type(out).__name__}, not one tensor; spdy runs "
                             "only single-output models in ONNX Runtime")
    m = _export(bundle, names, tensors, rebuild)
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
    return ExportedModel(m, names, feeds, "output", tuple(out.shape), {})


def _export(bundle: Any, names: list[str], tensors: list[Any], rebuild: Callable[[list[Any]], Any]) -> Any:
    """The ONNX model of ``bundle``'s forward on its example batch, inputs flattened to ``names``."""
    import onnx
    import torch

    model, fwd = bundle.model, bundle.forward

    class _Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *ts: Any) -> Any:
            return fwd(self.model, rebuild(list(ts)))

    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Wrapper().eval(), tuple(tensors), buf, dynamo=False, opset_version=OPSET,
                              input_names=names, output_names=["output"], do_constant_folding=True)
    except Exception as exc:  # the exporter raises many types
        raise ModelLoadError(f"exporting model {bundle.name!r} to ONNX failed: {exc}") from exc
    return onnx.load_from_string(buf.getvalue())


class _GraphIndex:
    """An exported graph's float initializers by value and its nodes by the tensors they read."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.by_key: dict[tuple[tuple[int, ...], str], list[str]] = {}
        self.arrays: dict[str, np.ndarray] = {}
        for t in graph.initializer:
            a = numpy_helper.to_array(t)
            if a.dtype != np.float32 or a.ndim not in (1, 2, 4):
                continue
            self.arrays[t.name] = a
            self.by_key.setdefault(_key(a), []).append(t.name)
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)

    def _weight_node(self, w: np.ndarray) -> tuple[Any, str] | None:
        """The one MatMul/Gemm/Conv node that reads ``w`` (or its transpose) alone, and the initializer."""
        keys = [(_key(w), "W")] + ([(_key(np.ascontiguousarray(w.T)), "Wt")] if w.ndim == 2 else [])
        for key, layout in keys:
            for init in self.by_key.get(key, []):
                users = self.consumers.get(init, [])
                if len(users) != 1:
                    continue
                node = users[0]
                if node.op_type not in ("MatMul", "Gemm", "Conv") or node.input[1] != init:
                    continue
                if node.op_type == "MatMul" and layout == "Wt":
                    return node, init
                if node.op_type == "Gemm":
                    tb = next((a.i for a in node.attribute if a.name == "transB"), 0)
                    if (tb == 1) == (layout == "W"):
                        return node, init
                if node.op_type == "Conv" and layout == "W":
                    return node, init
        return None

    def site(self, bundle: Any, spec: LayerSpec) -> LayerSite:
        """Where layer ``spec`` sits in the graph: its node (and bias Add), input, output and initializers."""
        mod = bundle.model.get_submodule(spec.name)
        w = mod.weight.detach().cpu().float().numpy()
        b = None if mod.bias is None else mod.bias.detach().cpu().float().numpy()
        found = self._weight_node(w)
        if found is None:
            raise ModelLoadError(
                f"cannot find layer {spec.name!r} in the exported ONNX graph of {bundle.name!r} (no MatMul/Gemm/Conv "
                "uses its weight alone; weights shared between layers or folded into other ops are not supported)"
            )
        node, winit = found
        site_nodes, inits, y = [node.name], [winit], node.output[0]
        if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]:
            inits.append(node.input[2])
        elif node.op_type == "MatMul" and b is not None:
            users = self.consumers.get(y, [])
            bias_key = _key(b)
            add = next((u for u in users if u.op_type == "Add" and len(users) == 1
                        and any(_key(self.arrays[i]) == bias_key for i in u.input if i in self.arrays)), None)
            if add is None:
                raise ModelLoadError(f"layer {spec.name!r}: its MatMul in the exported graph is not followed by the bias Add")
            site_nodes.append(add.name)
            inits.append(next(i for i in add.input if i in self.arrays))
            y = add.output[0]
        return LayerSite(site_nodes, node.input[0], y, inits)


def rewrite_model(exported: ExportedModel, specs: Mapping[str, LayerSpec], choices: Mapping[str, Any],
                  standin_shapes: Mapping[str, tuple[int, ...]]) -> tuple[Any, dict[str, np.ndarray], dict[str, str]]:
    """A copy of the exported model with each chosen layer rewritten.

    ``choices[name]`` is a :class:`~spdy.profilers.base.LayerChoice`; format ``standin``
    turns the layer's output into a graph input named after the layer (fed at run time).
    Returns the model, its sparse inputs (name -> weight) and the stand-ins' inputs (layer -> name).
    """
    import onnx
    from onnx import TensorProto, helper

    from spdy.profilers.base import STANDIN

    m = onnx.ModelProto()
    m.CopyFrom(exported.model)
    g = m.graph
    remove: dict[str, str] = {}  # node name -> layer name
    for name in choices:
        if name not in exported.sites:
            raise InvalidInputError(f"{name!r} is not a prunable layer of the exported model")
        for nn in exported.sites[name].nodes:
            remove[nn] = name
    drop_inits = {i for name in choices for i in exported.sites[name].initializers}
    new_nodes, new_inits, new_inputs, sparse = [], [], [], {}
    standin_inputs: dict[str, str] = {}
    graph_outputs = {o.name for o in g.output}
    emitted: set[str] = set()
    for i, node in enumerate(g.node):
        layer = remove.get(node.name)
        if layer is None:
            new_nodes.append(node)
            continue
        if layer in emitted:
            continue
        emitted.add(layer)
        site, ch = exported.sites[layer], choices[layer]
        if ch.fmt == STANDIN:
            feed = site.y
            if site.y in graph_outputs:  # a graph input cannot be the graph output itself
                feed = f"{site.y}/standin"
                new_nodes.append(helper.make_node("Identity", [feed], [site.y], name=f"spdy{i}/standin"))
            new_inputs.append(helper.make_tensor_value_info(feed, TensorProto.FLOAT, list(standin_shapes[layer])))
            standin_inputs[layer] = feed
            continue
        lg = layer_nodes(specs[layer], ch.fmt, site.x, site.y, f"spdy{i}", ch.weight, ch.bias)
        new_nodes += lg.nodes
        new_inits += lg.initializers
        for sname, w in lg.sparse_inputs.items():
            new_inputs.append(helper.make_sparse_tensor_value_info(sname, TensorProto.FLOAT, list(w.shape)))
            sparse[sname] = w
    kept_inits = [t for t in g.initializer if t.name not in drop_inits]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(kept_inits + new_inits)
    g.input.extend(new_inputs)
    # the stand-in outputs are graph inputs now; drop stale shape annotations of them
    standin_names = {exported.sites[n].y for n, c in choices.items() if c.fmt == STANDIN}
    kept_vi = [v for v in g.value_info if v.name not in standin_names]
    del g.value_info[:]
    g.value_info.extend(kept_vi)
    if not any(o.domain == MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return m, sparse, standin_inputs

"""ONNX graphs for ort-cpu: locating layers in an exported model and rewriting them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from spdy.errors import ModelLoadError  # noqa: E402
from spdy.profilers import DENSE, STANDIN, LayerChoice  # noqa: E402
from spdy.profilers.onnx_graph import COO, export_model, output_shape, rewrite_model  # noqa: E402
from spdy.profilers.pruning import LevelPruner  # noqa: E402
from spdy.types import LayerSpec  # noqa: E402


def _session(model):
    import onnxruntime as ort

    from spdy.profilers import ort_cpu

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.use_per_session_threads = not (ort_cpu._GLOBAL_POOL_THREADS or -1) > 0
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model, feeds):
    return _session(model).run(None, feeds)[0]


@pytest.mark.parametrize("model", ["tiny_mlp", "tiny_conv"])
def test_export_finds_every_layer(model, request):
    bundle = request.getfixturevalue(model)
    specs = bundle.layers()
    ex = export_model(bundle, specs)
    assert set(ex.sites) == {s.name for s in specs}
    with torch.inference_mode():
        ref = bundle.forward(bundle.model, bundle.example).numpy()
    assert np.allclose(_run(ex.model, ex.inputs), ref, atol=1e-4)


def test_rewritten_layers_compute_the_pruned_model(tiny_mlp):
    """Dense MatMul and SparseToDenseMatMul (COO, weight fed at run time) in one graph."""
    from spdy.profilers.ort_cpu import sparse_ortvalue

    specs = {s.name: s for s in tiny_mlp.layers()}
    ex = export_model(tiny_mlp, list(specs.values()))
    masked = __import__("copy").deepcopy(tiny_mlp.model)
    choices = {}
    for (name, spec), fmt in zip(specs.items(), [COO, DENSE, COO]):
        m = tiny_mlp.model.get_submodule(name)
        wp = LevelPruner(m.weight.detach().numpy()).at(0.7)
        b = None if m.bias is None else m.bias.detach().numpy()
        choices[name] = LayerChoice(fmt, wp, b, 0.7)
        with torch.no_grad():
            masked.get_submodule(name).weight.copy_(torch.from_numpy(wp))
    model, sparse, standins = rewrite_model(ex, specs, choices, {})
    assert not standins and len(sparse) == 2
    sess = _session(model)
    keep: list = []
    binding = sess.io_binding()
    for n, v in ex.inputs.items():
        binding.bind_cpu_input(n, v)
    for n, w in sparse.items():
        binding.bind_ortvalue_input(n, sparse_ortvalue(w, keep))
    binding.bind_output(ex.output_name)
    sess.run_with_iobinding(binding)
    out = binding.copy_outputs_to_cpu()[0]
    with torch.inference_mode():
        ref = tiny_mlp.forward(masked, tiny_mlp.example).numpy()
    assert np.allclose(out, ref, atol=1e-4)


def test_standin_of_the_output_layer_is_fed(tiny_mlp):
    specs = {s.name: s for s in tiny_mlp.layers()}
    ex = export_model(tiny_mlp, list(specs.values()))
    y = np.random.default_rng(0).standard_normal(ex.output_shape).astype(np.float32)
    model, _, standins = rewrite_model(ex, specs, {"head": LayerChoice(STANDIN)}, {"head": ex.output_shape})
    assert np.array_equal(_run(model, {**ex.inputs, standins["head"]: y}), y)


def test_a_layer_that_is_not_in_the_graph_is_reported(tiny_mlp):
    specs = tiny_mlp.layers()
    bogus = LayerSpec("ghost", "linear", (5, 7), (1, 3, 7))
    with pytest.raises(Exception):
        export_model(tiny_mlp, [*specs, bogus])


def test_shared_weights_are_refused():
    from spdy.models.base import ModelBundle

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    bundle = ModelBundle("tied", Tied(), [torch.randn(1, 4, 8)])
    with pytest.raises(ModelLoadError, match="cannot find layer"):
        export_model(bundle, bundle.layers())


def test_output_shape_of_conv():
    spec = LayerSpec("c", "conv2d", (16, 4, 3, 3), (1, 4, 12, 12), stride=(2, 2), padding=(1, 1))
    assert output_shape(spec) == (1, 16, 6, 6)

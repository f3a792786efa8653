from __future__ import annotations

import pytest
import torch
from torch import nn

from spdy.errors import InvalidInputError, ModelLoadError, NoPrunableLayersError
from spdy.models.base import (
    ModelBundle,
    cosine_distance,
    discover_layers,
    hash_batches,
    kl_divergence,
    load_model,
    relative_mse,
)


def test_factory_tuple_and_layer_discovery() -> None:
    b = load_model("tests.models.toy_factory:make")
    specs = b.layers()
    assert [s.name for s in specs] == ["conv", "fc1", "fc2"]  # depthwise and unused stay dense
    conv = specs[0]
    assert conv.kind == "conv2d" and conv.weight_shape == (4, 1, 3, 3) and conv.input_shape == (4, 1, 8, 8)
    assert conv.padding == (1, 1) and conv.matrix_shape == (4, 9)
    assert specs[1].input_shape == (4, 256)
    assert b.n_samples == 12


def test_factory_dict_with_named_loss_and_exclude() -> None:
    b = load_model("tests.models.toy_factory:make", loss="kl", exclude=["fc*"])
    assert b.loss is kl_divergence
    assert [s.name for s in b.layers()] == ["conv"]


def test_exclude_everything_is_a_clear_error() -> None:
    b = load_model("tests.models.toy_factory:make", exclude=["*"])
    with pytest.raises(NoPrunableLayersError, match="no prunable layer"):
        b.layers()


def test_no_prunable_layers() -> None:
    model = nn.Sequential(nn.ReLU())
    with pytest.raises(NoPrunableLayersError):
        discover_layers(model, torch.randn(2, 3))


def test_empty_calibration() -> None:
    with pytest.raises(InvalidInputError, match="calibration set is empty"):
        ModelBundle("m", nn.Linear(2, 2), [])


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nosuch.module:make", "cannot import"),
        ("tests.models.toy_factory:nope", "no callable"),
        ("tests.models.toy_factory:not_a_model", "returned int"),
        ("resnet", "unknown model"),
    ],
)
def test_bad_model_specs(spec: str, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        load_model(spec)


def test_losses_and_calibration_loss() -> None:
    b = load_model("tests.models.toy_factory:make")
    dense = b.outputs()
    assert b.calibration_loss(b.model, dense) == pytest.approx(0.0, abs=1e-12)
    pruned = load_model("tests.models.toy_factory:make").model
    with torch.no_grad():
        pruned.fc2.weight.zero_()
    assert b.calibration_loss(pruned, dense) > 0
    x = torch.randn(5, 7)
    assert float(relative_mse(x, x)) == 0.0
    assert float(cosine_distance(x, 2 * x)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_divergence(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(relative_mse(torch.zeros(5, 7), x)) == pytest.approx(1.0)


def test_calibration_hash_is_stable_and_sensitive() -> None:
    a = [torch.arange(6).reshape(2, 3)]
    assert hash_batches(a) == hash_batches([torch.arange(6).reshape(2, 3)])
    assert hash_batches(a) != hash_batches([torch.arange(6).reshape(3, 2)])
    assert hash_batches([{"x": a[0]}]) != hash_batches(a)

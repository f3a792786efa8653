from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from spdy.errors import InvalidInputError, ModelLoadError, NoPrunableLayersError
from spdy.models.base import (
    ModelBundle,
    batchnorm_modules,
    batchnorm_state,
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


def test_calibration_loss_on_some_batches() -> None:
    b = load_model("tests.models.toy_factory:make")
    dense = b.outputs()
    pruned = load_model("tests.models.toy_factory:make").model
    with torch.no_grad():
        pruned.fc2.weight.mul_(0.5)
    n = len(b.calibration)
    assert n >= 2
    assert b.calibration_loss(pruned, dense, range(n)) == pytest.approx(b.calibration_loss(pruned, dense))
    one = [b.calibration_loss(pruned, dense, [i]) for i in range(n)]
    sizes = [len(x) for x in b.calibration]
    assert b.calibration_loss(pruned, dense) == pytest.approx(np.average(one, weights=sizes))
    assert b.calibration_loss(pruned, dense, [1]) == pytest.approx(one[1])
    for bad in ([], [n], [-1]):
        with pytest.raises(InvalidInputError, match="calibration batch indices"):
            b.calibration_loss(pruned, dense, bad)


def test_calibration_hash_is_stable_and_sensitive() -> None:
    a = [torch.arange(6).reshape(2, 3)]
    assert hash_batches(a) == hash_batches([torch.arange(6).reshape(2, 3)])
    assert hash_batches(a) != hash_batches([torch.arange(6).reshape(3, 2)])
    assert hash_batches([{"x": a[0]}]) != hash_batches(a)


def _conv_bn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():  # stored statistics that do not match the data
        m[1].running_mean.fill_(5.0)
        m[4].running_var.fill_(9.0)
    return m.eval()


def test_batchnorm_tuning_matches_a_direct_computation() -> None:
    model = _conv_bn()
    batches = [torch.randn(4, 3, 6, 6) * (1 + i) + i for i in range(3)]
    b = ModelBundle("cnn", model, batches)
    assert b.tune_batchnorm is True and set(batchnorm_modules(model)) == {"1", "4"}
    assert ModelBundle("mlp", nn.Sequential(nn.Linear(3, 3)), [torch.randn(2, 3)]).tune_batchnorm is False
    b.retune_batchnorm(model)
    assert not model.training and all(not m.training for m in model.modules())
    assert model[1].momentum == 0.1  # restored
    # independent reference: per-batch statistics of each BatchNorm's input, the earlier one in batch mode
    means1, vars1, means2, vars2 = [], [], [], []
    with torch.no_grad():
        for x in batches:
            h = model[0](x)
            means1.append(h.mean((0, 2, 3)))
            vars1.append(h.var((0, 2, 3), unbiased=True))
            hn = (h - h.mean((0, 2, 3), keepdim=True)) / torch.sqrt(h.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
            hn = hn * model[1].weight[None, :, None, None] + model[1].bias[None, :, None, None]
            g = model[3](torch.relu(hn))
            means2.append(g.mean((0, 2, 3)))
            vars2.append(g.var((0, 2, 3), unbiased=True))
    torch.testing.assert_close(model[1].running_mean, torch.stack(means1).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, torch.stack(vars1).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[4].running_mean, torch.stack(means2).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[4].running_var, torch.stack(vars2).mean(0), rtol=1e-4, atol=1e-5)
    state = batchnorm_state(model)
    assert set(state) == {"1.running_mean", "1.running_var", "4.running_mean", "4.running_var"}


def test_batchnorm_tuning_can_be_switched_off() -> None:
    model = _conv_bn()
    before = batchnorm_state(model)
    b = ModelBundle("cnn", model, [torch.randn(4, 3, 6, 6)], tune_batchnorm=False)
    b.retune_batchnorm(model)
    for k, v in batchnorm_state(model).items():
        assert (v == before[k]).all()

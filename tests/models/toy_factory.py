"""A small model factory used through the 'package.module:factory' path in tests."""

from __future__ import annotations

import torch
from torch import nn


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # depthwise: stays dense
        self.fc1 = nn.Linear(4 * 8 * 8, 16)
        self.unused = nn.Linear(3, 3)  # never runs
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def make(n_batches: int = 3, loss: str | None = None):
    torch.manual_seed(0)
    model = Toy()
    batches = [torch.randn(4, 1, 8, 8) for _ in range(n_batches)]
    if loss is None:
        return model, batches
    return {"model": model, "calibration": batches, "loss": loss}


def not_a_model():
    return 42

"""Small real models with structured calibration data for the database tests.

Inputs are correlated (a random low-rank mix plus noise), one input feature of the
MLP is always zero (a dead input), so H is far from the identity and has a zero
diagonal entry, as in real networks.
"""

from __future__ import annotations

import torch
from torch import nn

from spdy.models.base import ModelBundle


def structured_inputs(n: int, d: int, seed: int, rank: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g) * 2.0
    scale = torch.linspace(0.2, 3.0, d)  # uneven feature scales
    return (torch.randn(n, rank, generator=g) @ basis + 0.3 * torch.randn(n, d, generator=g)) * scale


class MLP(nn.Module):
    DEAD = 5  # input feature that is always zero

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def make_mlp(n_batches: int = 4, batch: int = 32, seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    model = MLP()
    x = structured_inputs(n_batches * batch, 12, seed)
    x[:, MLP.DEAD] = 0.0
    return ModelBundle("toy-mlp", model, list(x.split(batch)))


def make_cnn(n_batches: int = 3, batch: int = 8, seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    model = CNN()
    g = torch.Generator().manual_seed(seed + 1)
    # smooth images: neighbouring pixels correlate, channels correlate
    base = torch.randn(n_batches * batch, 1, 8, 8, generator=g)
    base = nn.functional.avg_pool2d(nn.functional.pad(base, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.cat([base, 0.5 * base + 0.2 * torch.randn_like(base), torch.randn(n_batches * batch, 1, 8, 8, generator=g)], 1)
    return ModelBundle("toy-cnn", model, list(x.split(batch)))

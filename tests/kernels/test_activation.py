"""The GELU kernel against torch's exact GELU in float64."""

from __future__ import annotations

import pytest

import spdy.kernels as K  # noqa: F401 - before torch: one OpenMP runtime

import torch  # noqa: E402

from spdy.errors import InvalidInputError  # noqa: E402
from spdy.kernels.activation import CHUNK, gelu  # noqa: E402


@pytest.mark.parametrize("shape", [(0,), (1,), (15,), (17,), (3, 33), (128, 1536), (2, CHUNK + 5)])
def test_matches_exact_gelu(threads: int, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4
    ref = torch.nn.functional.gelu(x.double())
    got = gelu(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=0)


def test_tails_and_strided_inputs() -> None:
    x = torch.tensor([-50.0, -5.0, -1e-8, 0.0, 3.9, 4.1, 60.0])
    torch.testing.assert_close(gelu(x), torch.nn.functional.gelu(x), atol=1e-6, rtol=0)
    y = torch.randn(40, 32).t()  # not contiguous: copied
    torch.testing.assert_close(gelu(y), torch.nn.functional.gelu(y), atol=2e-6, rtol=0)


def test_refuses_what_it_cannot_run() -> None:
    with pytest.raises(InvalidInputError, match="float32 CPU"):
        gelu(torch.ones(3, dtype=torch.float64))
    with pytest.raises(InvalidInputError, match="requires grad"):
        gelu(torch.ones(3, requires_grad=True))

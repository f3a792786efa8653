"""The quality guard: the constant-output yardstick, top-1 agreement, and when it fires."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spdy.models.base import ModelBundle, cosine_distance, kl_divergence, relative_mse
from spdy.quality import FAR_RATIO, MIN_TOP1, WARN_TOP1, Quality, constant_loss, is_classifier, top1_agreement


def _bundle(loss) -> ModelBundle:
    return ModelBundle("m", torch.nn.Linear(4, 3), [torch.zeros(2, 4)], loss=loss)


def test_constant_loss_is_that_of_the_mean_output() -> None:
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(5, 3, generator=g) + 2.0, torch.randn(7, 3, generator=g) - 1.0]
    allx = torch.cat(outs).double()
    mean = allx.mean(0)
    # relative MSE of the mean, batch by batch, sample-weighted: computed directly
    want = sum(float(((o.double() - mean) ** 2).sum() / (o.double() ** 2).sum()) * len(o) for o in outs) / 12
    assert constant_loss(_bundle(relative_mse), outs) == pytest.approx(want, rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(allx, mean.expand_as(allx), dim=-1)
    assert constant_loss(_bundle(cosine_distance), outs) == pytest.approx(float((1 - cos).mean()), rel=1e-5)


def test_constant_loss_of_a_classifier_is_that_of_the_class_frequencies() -> None:
    g = torch.Generator().manual_seed(1)
    outs = [3 * torch.randn(6, 4, generator=g), 3 * torch.randn(2, 4, generator=g)]
    p = torch.softmax(torch.cat(outs).double(), dim=-1)
    prior = p.mean(0)
    want = float((p * (p.log() - prior.log())).sum(-1).mean())  # mean KL(p_i || class frequencies)
    assert constant_loss(_bundle(kl_divergence), outs) == pytest.approx(want, rel=1e-4)


def test_top1_agreement_counts_rows() -> None:
    d = [torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])]
    p = [torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])]
    assert top1_agreement(p, d) == pytest.approx(2 / 4)
    assert top1_agreement(d, d) == 1.0
    assert is_classifier(_bundle(kl_divergence)) and not is_classifier(_bundle(relative_mse))


@pytest.mark.parametrize(("loss", "top1", "far"), [
    (0.1, None, False), (FAR_RATIO - 0.01, None, False), (FAR_RATIO, None, True), (0.1, MIN_TOP1, False),
    (0.1, MIN_TOP1 - 0.01, True), (0.1, WARN_TOP1, False), (0.1, 1.0, False),
])
def test_far_and_its_message(loss: float, top1: float | None, far: bool) -> None:
    q = Quality(loss, 1.0, top1, 1.3 if far else None)
    assert q.far is far
    degraded = not far and top1 is not None and top1 < WARN_TOP1
    assert q.degraded is degraded
    msg = q.message(2.0)
    assert (msg != "") is (far or degraded)
    if far:
        assert "far from the dense one" in msg and f"{loss:.4g}" in msg and "1.3x" in msg
    if degraded:  # the answers changed: said with the numbers, no safer target claimed
        assert f"on {1 - top1:.0%} of the calibration samples" in msg and f"agreement {top1:.0%}" in msg
        assert "lower --speedup" in msg and "far from" not in msg
    assert q.to_json()["far"] is far and q.to_json()["degraded"] is degraded
    assert np.isfinite(q.to_json()["loss_over_constant"])


def test_a_reference_faster_than_the_dense_plan_is_named_when_no_target_is_safe() -> None:
    q = Quality(3.1, 1.9, 0.0, None, reference_floor=1.85)
    msg = q.message(1.1)
    assert "1.85x over spdy's own dense plan" in msg and "--reference torch" in msg and "calibration data" not in msg
    assert q.to_json()["reference_floor_dp_speedup"] == 1.85
    assert "calibration data" in Quality(3.1, 1.9, 0.0, None).message(1.1)

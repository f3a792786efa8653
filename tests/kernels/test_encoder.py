from __future__ import annotations

import numpy as np
import pytest
import torch

from spdy.kernels.attention import mask_bias
from spdy.kernels.encoder import EncoderPlan, LayerKernels
from spdy.kernels.linear import prepare_linear

WIDTH, HEADS, HEAD_DIM, HIDDEN = 64, 2, 32, 160


def _linear(rng: np.random.Generator, out: int, inp: int, fmt: str, sparsity: float = 0.8):
    W = (rng.standard_normal((out, inp)) * (rng.random((out, inp)) > sparsity) / np.sqrt(inp)).astype(np.float32)
    b = (rng.standard_normal(out) * 0.1).astype(np.float32)
    return W, b, prepare_linear(W, b, format=fmt)


def _norm(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    return ((1 + 0.1 * rng.standard_normal(WIDTH)).astype(np.float32), (0.1 * rng.standard_normal(WIDTH)).astype(np.float32),
            1e-12)


def _layer(seed: int, fmt: str, parts: str) -> tuple[LayerKernels, dict]:
    rng = np.random.default_rng(seed)
    w = {n: _linear(rng, o, i, fmt) for n, o, i in (("q", WIDTH, WIDTH), ("k", WIDTH, WIDTH), ("v", WIDTH, WIDTH),
                                                    ("o", WIDTH, WIDTH), ("up", HIDDEN, WIDTH), ("down", WIDTH, HIDDEN))}
    n1, n2 = _norm(rng), _norm(rng)
    lk = LayerKernels(qkv=(w["q"][2], w["k"][2], w["v"][2]) if "a" in parts else None, heads=HEADS, head_dim=HEAD_DIM,
                      scale=HEAD_DIM ** -0.5, out=(w["o"][2], n1) if "o" in parts else None,
                      ffn=(w["up"][2], w["down"][2], n2) if "f" in parts else None)
    return lk, {**{n: (v[0], v[1]) for n, v in w.items()}, "n1": n1, "n2": n2}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a)).double()


def _attention_ref(x: np.ndarray, w: dict, keep: torch.Tensor | None, B: int, T: int) -> np.ndarray:
    """Float64 torch: the three projections, softmax attention per head (masked keys left out)."""
    xt = _t(x).view(B, T, WIDTH)
    q, k, v = ((xt @ _t(w[n][0]).T + _t(w[n][1])).view(B, T, HEADS, HEAD_DIM).transpose(1, 2) for n in "qkv")
    s = q @ k.transpose(-1, -2) * HEAD_DIM ** -0.5
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B * T, WIDTH).numpy()


def _block_ref(a: np.ndarray, x: np.ndarray, w: dict) -> np.ndarray:
    y = _t(a) @ _t(w["o"][0]).T + _t(w["o"][1]) + _t(x)
    g, b, eps = w["n1"]
    return torch.nn.functional.layer_norm(y, (WIDTH,), _t(g), _t(b), eps).numpy()


def _ffn_ref(h: np.ndarray, w: dict) -> np.ndarray:
    u = torch.nn.functional.gelu(_t(h) @ _t(w["up"][0]).T + _t(w["up"][1]))
    y = u @ _t(w["down"][0]).T + _t(w["down"][1]) + _t(h)
    g, b, eps = w["n2"]
    return torch.nn.functional.layer_norm(y, (WIDTH,), _t(g), _t(b), eps).numpy()


def _padded(B: int, T: int) -> torch.Tensor | None:
    """The keep mask of ``B`` sequences of ``T`` tokens, the last padded after 11; None for one sequence."""
    if B == 1:
        return None
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[-1, 11:] = False
    return mask[:, None, None, :]


def _close_on_valid(keep: torch.Tensor | None, B: int, T: int):
    """An assertion that a [B * T, WIDTH] result matches a reference at the tokens ``keep`` keeps."""
    valid = np.ones(B * T, bool) if keep is None else keep[:, 0, 0, :].reshape(-1).numpy()

    def close(got: np.ndarray, ref: np.ndarray) -> None:
        got, ref = got.reshape(B * T, WIDTH)[valid], ref[valid]
        np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)

    return close


@pytest.mark.parametrize("fmt", ["csr", "bcsr4x1"])
@pytest.mark.parametrize("shape", [(1, 64), (2, 70), (3, 17)])
def test_plan_parts_match_float64_references(threads: int, fmt: str, shape: tuple[int, int]) -> None:
    B, T = shape
    layers = [_layer(0, fmt, "aof"), _layer(1, fmt, "a"), _layer(2, fmt, "of")]
    # every part from rows of tokens (a tiled plan runs layer 0, whose parts all fuse, on tiles)
    plan = EncoderPlan([lk for lk, _ in layers], B, T, WIDTH, threads, tiled=False)
    rng = np.random.default_rng(3)
    keep = _padded(B, T)
    bias = mask_bias(keep, B, T, T)
    x = rng.standard_normal(B * T * WIDTH).astype(np.float32)
    plan.input_of(0)[:] = x
    close = _close_on_valid(keep, B, T)

    # layer 0: every part
    w = layers[0][1]
    plan.attention(0, bias)
    a = _attention_ref(x, w, keep, B, T)
    close(plan.attention_out[: B * T * WIDTH], a)
    plan.attention_output(0)
    h = _block_ref(a, x.reshape(B * T, WIDTH), w)
    close(plan.block_out, h)
    plan.feed_forward(0)
    y = _ffn_ref(h, w)
    close(plan.output_of(0), y)
    # the buffers alternate: layer 1 reads what layer 0 wrote
    assert plan.input_of(1) is not plan.input_of(0)
    assert np.shares_memory(plan.input_of(1), plan.output_of(0))
    assert np.shares_memory(plan.output_of(1), plan.input_of(0))
    # layer 1: only the attention; layer 2: only the output block and the feed-forward
    plan.attention(1, bias)
    close(plan.attention_out[: B * T * WIDTH], _attention_ref(plan.input_of(1).copy(), layers[1][1], keep, B, T))
    a2 = rng.standard_normal((B * T, WIDTH)).astype(np.float32)
    plan.attention_out[: a2.size] = a2.reshape(-1)
    x2 = plan.input_of(2).copy()
    plan.attention_output(2)
    h2 = _block_ref(a2, x2.reshape(B * T, WIDTH), layers[2][1])
    close(plan.block_out, h2)
    plan.feed_forward(2)
    close(plan.output_of(2), _ffn_ref(h2, layers[2][1]))


def _layer_ref(x: np.ndarray, w: dict, keep: torch.Tensor | None, B: int, T: int) -> np.ndarray:
    a = _attention_ref(x, w, keep, B, T)
    return _ffn_ref(_block_ref(a, x.reshape(B * T, WIDTH), w), w)


@pytest.mark.parametrize("fmt", ["csr", "bcsr4x1"])
@pytest.mark.parametrize("shape", [(1, 64), (2, 70), (3, 17), (1, 130)])
def test_tiled_layers_match_float64_references(threads: int, fmt: str, shape: tuple[int, int]) -> None:
    B, T = shape  # 130 tokens: tiles of 64, 64 and 16 queries and keys
    layers = [_layer(0, fmt, "aof"), _layer(1, fmt, "aof"), _layer(2, fmt, "a")]
    plan = EncoderPlan([lk for lk, _ in layers], B, T, WIDTH, threads)
    assert plan.tiled and [plan.tiles_layer(i) for i in range(3)] == [True, True, False]
    assert plan._qkv[:2] == [None, None] and plan._qkv[2] is not None  # no row arguments for tiled layers
    rng = np.random.default_rng(4)
    keep = _padded(B, T)
    bias = mask_bias(keep, B, T, T)
    key_bias = None if bias is None else np.ascontiguousarray(bias.reshape(B, T, -1)[:, 0]).reshape(-1)
    x = rng.standard_normal(B * T * WIDTH).astype(np.float32)
    plan.input_of(0)[:] = x
    close = _close_on_valid(keep, B, T)

    plan.pack_input(0)
    plan.tiled_layer(0, key_bias)
    plan.unpack_output(0)
    y0 = _layer_ref(x, layers[0][1], keep, B, T)
    close(plan.output_of(0), y0)
    # layer 1 reads layer 0's output tiles as they are: nothing packed in between
    plan.output_of(0)[:] = np.nan
    plan.tiled_layer(1, key_bias)
    plan.unpack_output(1)
    close(plan.output_of(1), _layer_ref(y0.reshape(-1).astype(np.float32), layers[1][1], keep, B, T))


def test_tiled_attention_gives_zeros_to_a_query_whose_every_key_is_masked() -> None:
    from spdy.kernels import _attention, _spmm

    B, T, H, D = 2, 20, 2, 32
    Tpad = _spmm.padded_tokens_py(T)
    rng = np.random.default_rng(5)
    X = np.zeros(B * Tpad * 3 * H * D, np.float32)
    X[:] = rng.standard_normal(X.size)
    kb = np.zeros(B * 32, np.float32)
    kb[32:] = _attention.NEG  # every key of the second sequence masked
    work = np.zeros(2 * (Tpad + 3) * 64, np.float32)
    out = np.full(B * Tpad * H * D, np.nan, np.float32)
    _attention.attention_tiles(X, B, T, Tpad, H, D, 0.2, kb, 32, True, work, out, 2)
    per = H * D * Tpad
    assert np.isfinite(out[:per]).all() and np.abs(out[:per]).max() > 0
    assert (out[per:] == 0).all()


def test_a_plan_without_tiles_runs_every_part_from_rows() -> None:
    lk, _ = _layer(0, "csr", "aof")
    plan = EncoderPlan([lk, lk], 1, 40, WIDTH, 2, tiled=False)
    assert not plan.tiled and not plan.tiles_layer(0) and not plan.tiles_layer(1)
    part, _ = _layer(0, "csr", "af")
    assert not EncoderPlan([part], 1, 40, WIDTH, 2).tiled  # no layer with every part fused


def test_layer_kernels_say_which_parts_run_fused() -> None:
    full, _ = _layer(0, "csr", "aof")
    none, _ = _layer(0, "csr", "")
    part, _ = _layer(0, "csr", "o")
    assert (full.any, full.all) == (True, True)
    assert (none.any, none.all) == (False, False)
    assert (part.any, part.all) == (True, False)
    # a plan of layers without fused parts still gives its buffers
    plan = EncoderPlan([none], 2, 5, WIDTH, 2)
    assert plan.input_of(0).size == plan.output_of(0).size == 2 * 5 * WIDTH


@pytest.mark.parametrize("fmt", ["csr", "bcsr4x1"])
@pytest.mark.parametrize("shape", [(1, 128), (2, 70), (3, 17)])
def test_a_layer_on_tiles_matches_the_product_and_round_trips_the_layout(threads: int, fmt: str,
                                                                          shape: tuple[int, int]) -> None:
    from spdy.kernels import _spmm
    from spdy.kernels._workspace import aligned_empty

    B, T = shape
    rng = np.random.default_rng(8)
    W, b, p = _linear(rng, 48, WIDTH, fmt, sparsity=0.9)
    x = rng.standard_normal((B * T, WIDTH)).astype(np.float32)
    Tpad = _spmm.padded_tokens_py(T)
    xt, yt = aligned_empty(B * Tpad * WIDTH), aligned_empty(B * Tpad * 48)
    n = min(threads, B * -(-T // _spmm.TILE))
    _spmm.pack_tiles(x.reshape(-1), B, T, Tpad, WIDTH, xt, n)
    back = np.empty(B * T * WIDTH, np.float32)
    _spmm.unpack_tiles(xt, B, T, Tpad, WIDTH, back, n)
    np.testing.assert_array_equal(back.reshape(B * T, WIDTH), x)  # the layout round-trips exactly
    s = p.sparse
    _spmm.linear_tiles(xt, B, T, Tpad, WIDTH, 48, s.ptr, s.n_panels, s.col, s.val, s.blocked, p.bias, yt, n)
    y = np.empty(B * T * 48, np.float32)
    _spmm.unpack_tiles(yt, B, T, Tpad, 48, y, n)
    ref = (_t(x) @ _t(W).T + _t(b)).numpy()
    np.testing.assert_allclose(y.reshape(B * T, 48), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)

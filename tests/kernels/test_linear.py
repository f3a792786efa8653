"""Exactness of the Linear kernels against a float64 dense matmul, every format."""

from __future__ import annotations

import numpy as np
import pytest

import spdy.kernels as K
from spdy.errors import InvalidInputError
from spdy.kernels.linear import panel_width, token_waste


def _weight(rng: np.random.Generator, o: int, i: int, sparsity: float) -> np.ndarray:
    w = rng.standard_normal((o, i)).astype(np.float32)
    return w * (rng.random((o, i)) >= sparsity)


def _check(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, fmt: str, **kw) -> None:
    p = K.prepare_linear(w, b, format=fmt, **kw)
    y = K.linear(x, p)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    if b is not None:
        ref += b
    assert y.shape == ref.shape and y.dtype == np.float32
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(y, ref, atol=2e-5 * scale * np.sqrt(w.shape[1] / 64 + 1), rtol=0)
    np.testing.assert_array_equal(p.to_dense(), w)


@pytest.mark.parametrize("fmt", K.FORMATS)
@pytest.mark.parametrize(
    "tokens,o,i,sparsity",
    [
        (1, 1, 1, 0.0),  # batch 1, a single weight
        (1, 7, 13, 0.5),  # odd sizes, one token
        (3, 33, 130, 0.9),
        (16, 16, 16, 0.0),  # exactly one vector of tokens, dense
        (17, 31, 65, 0.7),  # one token past a vector
        (33, 48, 12, 0.3),  # tail tile of 32
        (64, 40, 200, 0.95),
        (100, 129, 257, 0.8),  # full tile + 48-token tail, odd rows/columns
        (128, 384, 384, 0.9),
        (130, 64, 1536, 0.98),
        (77, 20, 40, 1.0),  # everything pruned: y = b
    ],
)
def test_linear_matches_dense(fmt: str, tokens: int, o: int, i: int, sparsity: float, threads: int) -> None:
    if (fmt.startswith("bcsr1x4") and i % 4) or (fmt.startswith("bcsr4x1") and o % 4):
        pytest.skip(f"{fmt} needs the blocked dimension divisible by 4")
    rng = np.random.default_rng(tokens * 1000 + o + i)
    w = _weight(rng, o, i, sparsity)
    x = rng.standard_normal((tokens, i)).astype(np.float32)
    _check(x, w, rng.standard_normal(o).astype(np.float32), fmt)
    _check(x, w, None, fmt)


@pytest.mark.parametrize("fmt", ["csr", "bcsr1x4", "bcsr4x1"])
def test_zero_rows_and_columns(fmt: str, threads: int) -> None:
    rng = np.random.default_rng(1)
    w = _weight(rng, 96, 96, 0.5)
    w[::3] = 0  # all-zero output rows
    w[:, 5:37] = 0  # all-zero input columns (one whole panel at narrow panels)
    w[40:56] = 0  # a whole 16-row block
    x = rng.standard_normal((70, 96)).astype(np.float32)
    x[:, 60] = 0  # an all-zero input feature
    _check(x, w, rng.standard_normal(96).astype(np.float32), fmt)
    _check(x, w, None, fmt, panel=16)


@pytest.mark.parametrize("tokens", [1, 20, 40, 64, 150])
def test_blocked_patterns_and_explicit_zeros(tokens: int, threads: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((tokens, 64)).astype(np.float32)
    # 1x4: aligned groups of 4 inputs
    mask = np.repeat(rng.random((24, 16)) > 0.7, 4, axis=1)
    w = (rng.standard_normal((24, 64)) * mask).astype(np.float32)
    w[0, 4:8] = [1.0, 0.0, 0.0, 2.0]  # a group with explicit zeros inside
    p = K.prepare_linear(w, format="bcsr1x4")
    assert p.stored == 4 * np.count_nonzero(w.reshape(24, 16, 4).any(axis=2))
    _check(x, w, rng.standard_normal(24).astype(np.float32), "bcsr1x4")
    # 4x1: aligned groups of 4 output rows
    mask = np.repeat(rng.random((6, 64)) > 0.7, 4, axis=0)
    w = (rng.standard_normal((24, 64)) * mask).astype(np.float32)
    w[4:8, 3] = [0.0, 5.0, 0.0, 0.0]
    p = K.prepare_linear(w, format="bcsr4x1")
    assert p.stored == 4 * np.count_nonzero(w.reshape(6, 4, 64).any(axis=1))
    _check(x, w, rng.standard_normal(24).astype(np.float32), "bcsr4x1")
    _check(x, w, None, "bcsr4x1", panel=16)


def test_leading_dims_out_and_dtype_conversion() -> None:
    rng = np.random.default_rng(3)
    w = _weight(rng, 24, 40, 0.8)
    p = K.prepare_linear(w, format="csr")
    x = rng.standard_normal((2, 5, 40)).astype(np.float32)
    out = np.empty((2, 5, 24), np.float32)
    assert K.linear(x, p, out=out) is out
    np.testing.assert_allclose(out, x @ w.T, atol=1e-4)
    # float64 and non-contiguous input are converted
    x64 = np.asfortranarray(x.reshape(10, 40).astype(np.float64))
    np.testing.assert_allclose(p(x64), x.reshape(10, 40) @ w.T, atol=1e-4)
    # zero tokens
    assert K.linear(np.zeros((0, 40), np.float32), p).shape == (0, 24)


def test_repeated_calls_reuse_scratch_correctly() -> None:
    rng = np.random.default_rng(4)
    ps = [K.prepare_linear(_weight(rng, o, i, 0.9), format="csr") for o, i in [(64, 32), (32, 64), (300, 20)]]
    for _ in range(3):
        for p in ps:
            for t in (1, 70, 5):
                x = rng.standard_normal((t, p.in_features)).astype(np.float32)
                np.testing.assert_allclose(p(x), x @ p.to_dense().T, atol=1e-4)


def test_validation_messages() -> None:
    w = np.eye(8, dtype=np.float32)
    with pytest.raises(InvalidInputError, match="unknown format"):
        K.prepare_linear(w, format="coo")
    with pytest.raises(InvalidInputError, match="2 dimensions"):
        K.prepare_linear(np.ones(8, np.float32))
    with pytest.raises(InvalidInputError, match="NaN"):
        K.prepare_linear(np.full((2, 2), np.nan, np.float32))
    with pytest.raises(InvalidInputError, match="bias must have shape"):
        K.prepare_linear(w, np.ones(3, np.float32))
    with pytest.raises(InvalidInputError, match="divisible by 4"):
        K.prepare_linear(np.ones((2, 6), np.float32), format="bcsr1x4")
    with pytest.raises(InvalidInputError, match="out_features divisible by 4"):
        K.prepare_linear(np.ones((6, 4), np.float32), format="bcsr4x1")
    p = K.prepare_linear(w, format="csr")
    with pytest.raises(InvalidInputError, match="8 features"):
        K.linear(np.ones((2, 7), np.float32), p)
    with pytest.raises(InvalidInputError, match="numpy array"):
        K.linear([[1.0] * 8], p)
    with pytest.raises(InvalidInputError, match="out must be"):
        K.linear(np.ones((2, 8), np.float32), p, out=np.empty((2, 9), np.float32))
    with pytest.raises(InvalidInputError, match="prepare_linear"):
        K.linear(np.ones((2, 8), np.float32), w)  # type: ignore[arg-type]
    assert issubclass(InvalidInputError, ValueError)


def test_auto_rule() -> None:
    rng = np.random.default_rng(5)
    dense = rng.standard_normal((32, 32)).astype(np.float32)
    assert K.choose_format(dense) == "dense"
    sparse = _weight(rng, 32, 32, 0.6)
    assert K.choose_format(sparse) == "csr"
    assert K.choose_format(sparse, tokens=128) == "csr"
    assert K.choose_format(sparse, tokens=1) == "dense"  # 16x rounding waste
    assert K.choose_format(_weight(rng, 32, 32, 0.97), tokens=1) == "csr"
    blocked = (rng.standard_normal((32, 32)) * np.repeat(rng.random((32, 8)) > 0.7, 4, axis=1)).astype(np.float32)
    assert K.choose_format(blocked) == "bcsr1x4"
    blocked = (rng.standard_normal((32, 32)) * np.repeat(rng.random((8, 32)) > 0.7, 4, axis=0)).astype(np.float32)
    assert K.choose_format(blocked) == "bcsr4x1"
    assert K.prepare_linear(sparse).format == "csr"
    assert token_waste(None) == 1.0 and token_waste(8) == 2.0 and token_waste(128) == 1.0
    # deterministic: same input, same answer
    assert {K.choose_format(sparse, 100) for _ in range(5)} == {K.choose_format(sparse, 100)}


def test_panel_width_rule() -> None:
    assert panel_width(0.4, 384) == 128
    assert panel_width(0.05, 384) == 384
    assert panel_width(0.05, 1536) == 384
    assert panel_width(0.02, 1536) == 768
    assert panel_width(0.0, 10) == 10
    assert 1 <= panel_width(1.0, 3) <= 3


def test_serial_formats_never_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``-1t`` format runs the serial kernel even when the runtime has several threads; the
    parallel entry point is never called (and the result is the same as the parallel format's)."""
    from spdy.kernels import _spmm

    rng = np.random.default_rng(5)
    w = _weight(rng, 64, 96, 0.9)
    x = rng.standard_normal((40, 96)).astype(np.float32)
    before = K.get_num_threads()
    K.set_num_threads(2)
    try:
        want = K.linear(x, K.prepare_linear(w, None, format="csr"))

        def forked(*args: object) -> None:
            raise AssertionError("a serial format entered the parallel kernel")

        monkeypatch.setattr(_spmm, "tiles_forward", forked)
        for fmt in ("csr-1t", "bcsr1x4-1t", "bcsr4x1-1t"):
            p = K.prepare_linear(w, None, format=fmt)
            assert p.serial and p.format == fmt and K.is_serial(fmt)
            np.testing.assert_allclose(K.linear(x, p), want, rtol=0, atol=1e-4)
        with pytest.raises(AssertionError, match="parallel kernel"):
            K.linear(x, K.prepare_linear(w, None, format="csr"))
    finally:
        K.set_num_threads(before)


@pytest.mark.skipif(not K.DNNL, reason="torch without oneDNN: no dnnl format")
def test_dnnl_weight_is_packed_once_and_copies_pack_their_own() -> None:
    import copy
    import pickle

    rng = np.random.default_rng(5)
    w = _weight(rng, 48, 40, 0.0)
    b = rng.standard_normal(48).astype(np.float32)
    p = K.prepare_linear(w, b, format="dnnl", tokens=20)
    assert p.dnnl_weight() is p.dnnl_weight()  # packed at load time, kept
    x = rng.standard_normal((2, 20, 40)).astype(np.float32)  # leading dims and another row count
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    for q in (p, copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        np.testing.assert_allclose(K.linear(x, q), ref, atol=1e-4, rtol=0)
    assert "_dnnl" not in p.__getstate__()  # the packed tensor is not what a copy carries


@pytest.mark.parametrize("fmt", ["csr", "bcsr1x4", "bcsr4x1"])
@pytest.mark.parametrize("nthreads", [2, 3, 4, 5])
@pytest.mark.parametrize("tokens", [1, 50, 64, 128, 200])
def test_token_tiles_split_any_thread_count(fmt: str, nthreads: int, tokens: int) -> None:
    """The parallel kernel for more work items than the pool has threads (a bigger machine's
    split): tiles per thread, or the rows of one tile between several threads."""
    from spdy.kernels.linear import tiles_into

    rng = np.random.default_rng(nthreads * 1000 + tokens)
    w = _weight(rng, 96, 80, 0.8)
    b = rng.standard_normal(96).astype(np.float32)
    x = rng.standard_normal((tokens, 80)).astype(np.float32)
    p = K.prepare_linear(w, b, format=fmt)
    y = np.full((tokens, 96), np.nan, np.float32)
    tiles_into(x.reshape(-1), False, 1, tokens, 80, 96, p, y.reshape(-1), nthreads)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64) + b, atol=1e-4, rtol=0)

"""Layer-wise reconstruction at every sparsity level of a grid.

Every method takes a layer's weight as a GEMM operand ``W`` of shape
``(out, in)`` (a Conv2d weight flattened to ``(out, in*kh*kw)``), the Hessian
``H = sum_x x^T x`` of its inputs (float64, ``(in, in)``) and the target
sparsities, and returns the pruned weight ``What`` at every level together with
its prune mask and its relative reconstruction error

    err = ||X W^T - X What^T||^2 / ||X W^T||^2 = tr(D H D^T) / tr(W H W^T),  D = W - What,

computed from ``H`` alone (no activations are kept).

Methods
-------
``obs`` (default)
    SparseGPT (Frantar & Alistarh 2023, Algorithm 1) run at every level at once.
    ``H`` is damped (``damp * mean(diag H)`` on the diagonal); the upper Cholesky
    factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) is computed once per layer and
    shared by all levels: the rows of all levels are stacked and swept together,
    column by column, with the OBS update ``W[:, j>i] -= (w_i - q_i) / U_ii * U_i,j``.
    Masks are chosen adaptively per block of ``blocksize`` columns from the OBS
    saliency ``w^2 / U_ii^2`` (``U_ii^2 = [H_F^-1]_ii`` over the not-yet-swept
    columns F) of the partially updated weights; the zeros of each level are
    split across blocks by largest remainder, so every level has exactly
    ``round(s * numel)`` zeros. The in-block sweep is a Numba kernel
    (``_kernels.sweep_block``); the updates between blocks are GEMMs. The errors
    come out of the sweep's OBS loss increments (see :func:`obs`).
``exact``
    The masks of ``obs``, then the least-squares optimum for each row over its
    kept inputs K: ``H[K, K] w_K = (H w0)_K`` (the normal equations of
    ``min ||X w0^T - X[:, K] w_K^T||``), one Cholesky factorisation per row and
    level in float64 (Numba, ``_kernels.solve_kept_rows``). With the same masks its
    error is never above ``obs``'s (up to rounding). ``damp`` defaults to 0 here:
    the plain least-squares solution. Using OBS's masks (rather than magnitude
    masks) makes ``exact`` the best of the three at every level.
``magnitude``
    The ``round(s * numel)`` smallest ``|w|`` of the layer are zeroed; no refit.

Dead inputs (a zero diagonal entry of ``H``: the input is always 0) get diagonal
1 before damping, as in SparseGPT; their weights are pruned first (they cannot
change the output) and, in ``exact`` mode, kept ones keep their value.

N:M patterns (``patterns=("2:4", "4:8")`` in :func:`reconstruct`)
-----------------------------------------------------------------
Every row keeps exactly ``N`` of each group of ``M`` consecutive inputs (of the
flattened ``(out, in*kh*kw)`` matrix for a Conv2d). ``obs`` (:func:`obs_nm`): the same
column sweep with the same Cholesky factor ``U`` as the unstructured levels, the mask
chosen inside the sweep as SparseGPT does for N:M: at the first column of each group,
the ``M - N`` columns with the smallest saliency ``w^2 / U_ii^2`` of the row's current
(already compensated) weights are pruned (``_kernels.sweep_block_nm``). ``exact``: those
masks, then the exact refit. ``magnitude`` (:func:`magnitude_nm`): the ``M - N``
smallest ``|w|`` of each group, no refit. A layer whose input size is not a multiple of
``M`` has no such pattern (the caller records that; :func:`obs_nm` refuses it).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from spdy.choices import NMPattern, parse_pattern
from spdy.database._kernels import solve_kept_rows, sweep_block, sweep_block_nm
from spdy.errors import InvalidInputError

log = logging.getLogger(__name__)

METHODS = ("obs", "exact", "magnitude")
DEFAULT_DAMP = {"obs": 0.01, "exact": 0.0, "magnitude": 0.0}


@dataclass
class Reconstruction:
    """All levels of one layer: ``weights[s]`` is the pruned ``W`` at ``sparsities[s]``.

    N:M patterns (when asked for): ``patterns[k]`` names pattern ``k``; ``pattern_weights[k]``,
    ``pattern_pruned[k]`` and ``pattern_errors[k]`` are its weight, mask and error, None for
    a pattern the layer cannot hold (``pattern_skipped[k]`` says why).
    """

    weights: torch.Tensor  # [S, out, in] float32
    pruned: torch.Tensor  # [S, out, in] bool, True where the weight is pruned
    errors: np.ndarray  # [S] float64 relative reconstruction errors
    patterns: tuple[str, ...] = ()
    pattern_weights: list[torch.Tensor | None] = field(default_factory=list)  # [out, in] float32 each
    pattern_pruned: list[torch.Tensor | None] = field(default_factory=list)  # [out, in] bool each
    pattern_errors: list[float | None] = field(default_factory=list)
    pattern_skipped: list[str | None] = field(default_factory=list)


@dataclass(frozen=True)
class InverseFactor:
    """The damped Hessian's inverse as an upper Cholesky factor, shared by every level and pattern.

    ``U^T U = Hd^-1`` with ``Hd = H + shift * I + diag(dead)`` (see :func:`damped_hessian`,
    :func:`upper_cholesky_of_inverse`); ``U`` is float32.
    """

    U: torch.Tensor
    dead: torch.Tensor
    shift: float


def inverse_factor(H: torch.Tensor, damp: float) -> InverseFactor:
    """Damp ``H`` and factor its inverse once (the expensive part of a layer's OBS sweeps)."""
    Hd, dead, lam = damped_hessian(H, damp)
    U, jitter = upper_cholesky_of_inverse(Hd)
    return InverseFactor(U.to(torch.float32), dead, lam + jitter)


@contextlib.contextmanager
def _numba_threads_like_torch() -> Iterator[None]:
    """Run the Numba sweep with torch's thread count (one thread budget for both pools)."""
    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    before = numba.get_num_threads()
    numba.set_num_threads(want)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def zeros_per_level(sparsities: np.ndarray, numel: int) -> np.ndarray:
    """The exact number of zeros of each level: ``round(s * numel)``."""
    return np.rint(np.asarray(sparsities, dtype=np.float64) * numel).astype(np.int64)


def _largest_remainder(total: int, sizes: np.ndarray) -> np.ndarray:
    """Split ``total`` into integer parts proportional to ``sizes`` that sum to ``total``."""
    quota = total * sizes / sizes.sum()
    base = np.floor(quota).astype(np.int64)
    rest = int(total - base.sum())
    if rest:
        order = np.argsort(-(quota - base), kind="stable")
        base[order[:rest]] += 1
    return np.minimum(base, sizes.astype(np.int64))


def _check(W: torch.Tensor, H: torch.Tensor | None, sparsities: np.ndarray) -> None:
    if W.ndim != 2:
        raise InvalidInputError(f"W must be a 2-D (out, in) matrix; got shape {tuple(W.shape)}")
    if H is not None and tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise InvalidInputError(f"H must be ({W.shape[1]}, {W.shape[1]}) for W of shape {tuple(W.shape)}; got {tuple(H.shape)}")
    s = np.asarray(sparsities, dtype=np.float64)
    if s.ndim != 1 or np.any(s < 0) or np.any(s >= 1):
        raise InvalidInputError(f"sparsities must be a 1-D list in [0, 1); got {s!r}")


def damped_hessian(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``Hd``: ``H`` with dead inputs' diagonal set to 1, plus ``λ = damp * mean(diag)`` on the
    diagonal; also the dead-input mask and ``λ``."""
    Hd = H.to(torch.float64).clone()
    diag = torch.diagonal(Hd)
    dead = diag == 0
    diag[dead] = 1.0
    lam = 0.0
    if damp > 0:
        lam = float(damp * diag.mean())
        diag += lam
    return Hd, dead, lam


def upper_cholesky_of_inverse(Hd: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Upper-triangular ``U`` with ``U^T U = Hd^-1``, without forming the inverse.

    With ``J`` the reversal permutation and ``J Hd J = L L^T``: ``Hd^-1 = (J L^-T J)(J L^-1 J)``,
    so ``U = J L^-1 J`` (one Cholesky and one triangular inverse). A matrix that is not
    positive definite gets more damping (logged) until it is; that extra diagonal is returned
    with ``U``.
    """
    n = Hd.shape[0]
    flipped = torch.flip(Hd, (0, 1))
    eye = torch.eye(n, dtype=Hd.dtype)
    jitter = 0.0
    scale = float(torch.diagonal(Hd).mean())
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(flipped + jitter * eye if jitter else flipped)
        if int(info) == 0:
            break
        jitter = scale * (1e-8 if jitter == 0 else jitter / scale * 10)
        log.warning("H is not positive definite; adding %.3g to its diagonal", jitter)
    else:
        raise InvalidInputError("H is not positive definite even with heavy damping; is it finite and symmetric?")
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    return torch.flip(Linv, (0, 1)), jitter


def relative_errors(W: torch.Tensor, weights: torch.Tensor, H: torch.Tensor, chunk_bytes: int = 256 << 20) -> np.ndarray:
    """``tr(D_s H D_s^T) / tr(W H W^T)`` for every level ``s`` (``D_s = W - weights[s]``).

    Computed in float32 on ``H`` scaled to unit mean diagonal (float64 for small layers).
    """
    out, d = W.shape
    small = weights.numel() * d <= 50_000_000
    dt = torch.float64 if small else torch.float32
    scale = float(torch.diagonal(H).mean()) or 1.0
    Hs = (H.to(torch.float64) / scale).to(dt)
    W0 = W.to(dt)
    denom = float(((W0 @ Hs) * W0).sum())
    S = weights.shape[0]
    per = max(1, int(chunk_bytes // max(1, out * d * (4 if dt == torch.float32 else 8) * 3)))
    errs = np.empty(S, dtype=np.float64)
    for s0 in range(0, S, per):
        D = (W0.unsqueeze(0) - weights[s0 : s0 + per].to(dt)).reshape(-1, d)
        num = ((D @ Hs) * D).reshape(-1, out * d).sum(1, dtype=torch.float64)
        errs[s0 : s0 + per] = num.numpy()
    if denom <= 0:
        # X W^T is zero on the calibration data: any pruning is "exact"
        return np.zeros(S) if not np.any(errs > 0) else np.full(S, np.inf)
    return np.maximum(errs / denom, 0.0)


def magnitude(W: torch.Tensor, sparsities: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the ``round(s * numel)`` smallest ``|w|`` per level (nested masks); no refit."""
    _check(W, None, sparsities)
    out, d = W.shape
    Z = zeros_per_level(sparsities, out * d)
    order = torch.argsort(W.abs().reshape(-1), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    ranks = rank.view(out, d)
    pruned = torch.stack([ranks < int(z) for z in Z])
    weights = W.float().unsqueeze(0).masked_fill(pruned, 0.0)
    return weights, pruned


def obs(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsities: np.ndarray,
    damp: float = 0.01,
    blocksize: int = 128,
    factor: InverseFactor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """SparseGPT's column sweep with adaptive OBS masks at every level at once (see module doc).

    ``factor`` (from :func:`inverse_factor` with the same ``H`` and ``damp``) skips the factorisation.

    Returns ``(weights [S, out, in] float32, pruned [S, out, in] bool, errors [S])``. Level
    ``s == 0`` returns ``W`` unchanged. The errors come from the sweep itself: the OBS loss
    increments ``e_i^2`` add up to ``D Hd D^T`` exactly, and with ``Hd = H + c I + diag(dead)``
    the true ``D H D^T = sum e^2 - c ||D||^2 - ||D_dead||^2`` (no extra ``S x out x in^2`` GEMM).
    """
    _check(W, H, sparsities)
    sp = np.asarray(sparsities, dtype=np.float64)
    out, d = W.shape
    S = len(sp)
    W32 = W.detach().to(torch.float32)
    weights = W32.unsqueeze(0).repeat(S, 1, 1)
    pruned = torch.zeros((S, out, d), dtype=torch.bool)
    errors = np.zeros(S, dtype=np.float64)
    active = np.flatnonzero(sp > 0)
    if len(active) == 0:
        return weights, pruned, errors
    A = len(active)
    if factor is None:
        factor = inverse_factor(H, damp)
    U, dead, shift = factor.U, factor.dead, factor.shift  # Hd (as factored) = H + shift * I + diag(dead)
    dead_np = dead.numpy()

    Z = zeros_per_level(sp[active], out * d)
    nblocks = math.ceil(d / blocksize)
    block_sizes = np.array([out * (min(d, (b + 1) * blocksize) - b * blocksize) for b in range(nblocks)], dtype=np.float64)
    Zb = np.stack([_largest_remainder(int(z), block_sizes) for z in Z])  # [A, nblocks]

    WT, MT, loss = _sweep_levels(W32, U, dead_np, Zb, blocksize)

    # Pruned weights are exactly zero (masked_fill above); back to [A, out, d], level by level
    # (a level's [out, d] at a time: no second all-levels copy next to WT and weights).
    for a, s in enumerate(active):
        weights[int(s)].copy_(WT[:, a * out : (a + 1) * out].t())
        pruned[int(s)].copy_(MT[:, a * out : (a + 1) * out].t())
    del WT, MT  # the sweep's all-levels buffers go before the error pass

    errors[active] = _sweep_errors(W, H, [weights[int(s)] for s in active], loss.reshape(A, out).sum(1), factor)
    return weights, pruned, errors


def _sweep_levels(W32: torch.Tensor, U: torch.Tensor, dead_np: np.ndarray, Zb: np.ndarray,
                  blocksize: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """:func:`obs`'s column sweep of all ``A = len(Zb)`` levels at once: ``(WT [d, A*out] float32,
    MT [d, A*out] bool, loss [A*out])``, level ``a`` in columns ``a*out .. (a+1)*out``; ``Zb[a, b]``
    is level ``a``'s number of zeros in block ``b``."""
    out, d = W32.shape
    A, nblocks = Zb.shape
    # Transposed layout: column i of every row of every level is the contiguous row WT[i].
    WT = W32.t().contiguous().repeat(1, A)  # [d, A*out]
    MT = torch.zeros((d, A * out), dtype=torch.bool)
    loss = np.zeros(A * out, dtype=np.float64)
    for b in range(nblocks):
        i1, i2 = b * blocksize, min(d, (b + 1) * blocksize)
        n = i2 - i1
        W1 = WT[i1:i2]
        U1 = U[i1:i2, i1:i2]
        # Adaptive mask for this block: the Zb smallest saliencies w^2 / U_ii^2 per level.
        sal = (W1.square() / torch.diagonal(U1).square().unsqueeze(1)).numpy()
        sal = sal.reshape(n, A, out)
        sal[dead_np[i1:i2]] = -1.0  # dead inputs go first
        M1 = np.zeros((n, A, out), dtype=bool)
        for a in range(A):
            k = int(Zb[a, b])
            if k <= 0:
                continue
            flat = np.ascontiguousarray(sal[:, a, :]).reshape(-1)
            if k >= flat.size:
                M1[:, a, :] = True
                continue
            idx = np.argpartition(flat, k - 1)[:k]
            m = np.zeros(flat.size, dtype=bool)
            m[idx] = True
            M1[:, a, :] = m.reshape(n, out)
        M1t = torch.from_numpy(M1.reshape(n, A * out))
        MT[i1:i2] = M1t
        E1 = torch.empty((n, A * out), dtype=torch.float32)
        # Sweep the block's columns (numba; rows in parallel, see _kernels.py)
        with _numba_threads_like_torch():
            sweep_block(W1.numpy(), M1t.numpy(), U1.contiguous().numpy(), E1.numpy(), loss)
        if i2 < d:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)
    return WT, MT, loss


def _sweep_errors(W: torch.Tensor, H: torch.Tensor, weights: Sequence[torch.Tensor], loss: np.ndarray,
                  factor: InverseFactor) -> np.ndarray:
    """True relative errors of swept weights (``[out, d]`` each) from their damped sweep losses ``[A]``
    (see :func:`obs`: ``D H D^T = sum e^2 - shift ||D||^2 - ||D_dead||^2``).

    One level at a time: the temporaries are one ``[out, d]`` difference, never ``[A, out, d]``
    (on a 4096 x 1024 layer at 41 levels those were several GiB).
    """
    dead = factor.dead
    any_dead = bool(dead.any())
    W32 = W.detach().to(torch.float32)
    sq = np.empty(len(weights), dtype=np.float64)
    sq_dead = np.zeros(len(weights), dtype=np.float64)
    for a, w in enumerate(weights):
        D = W32 - w
        sq[a] = float(D.square().sum(dtype=torch.float64))
        if any_dead:
            sq_dead[a] = float(D[:, dead].square().sum(dtype=torch.float64))
    num = loss - factor.shift * sq - sq_dead
    W64 = W.detach().to(torch.float64)
    denom = float(((W64 @ H.to(torch.float64)) * W64).sum())
    return np.maximum(num / denom, 0.0) if denom > 0 else (np.where(num > 0, np.inf, 0.0))


def _check_nm(W: torch.Tensor, pattern: NMPattern) -> None:
    if W.ndim != 2:
        raise InvalidInputError(f"W must be a 2-D (out, in) matrix; got shape {tuple(W.shape)}")
    why = pattern.why_not(int(W.shape[1]))
    if why:
        raise InvalidInputError(f"a {pattern.name} pattern does not fit W of shape {tuple(W.shape)}: {why}")


def magnitude_nm(W: torch.Tensor, pattern: NMPattern | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the ``M - N`` smallest ``|w|`` of every group of ``M`` consecutive inputs per row
    (ties to the lower column); no refit. Returns ``(weights, pruned)``, both ``[out, in]``."""
    pat = parse_pattern(pattern)
    _check_nm(W, pat)
    out, d = W.shape
    W32 = W.detach().to(torch.float32)
    groups = W32.abs().reshape(out, d // pat.m, pat.m)
    order = torch.argsort(groups, dim=-1, stable=True)
    pruned = torch.zeros_like(groups, dtype=torch.bool)
    pruned.scatter_(-1, order[..., : pat.m - pat.n], True)
    pruned = pruned.reshape(out, d)
    return W32.masked_fill(pruned, 0.0), pruned


def obs_nm(
    W: torch.Tensor,
    H: torch.Tensor,
    pattern: NMPattern | str,
    damp: float = 0.01,
    blocksize: int = 128,
    factor: InverseFactor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SparseGPT's sweep with an N:M mask chosen group by group inside it (see the module doc).

    Uses ``factor`` (the layer's :class:`InverseFactor`; computed when None), so the N:M
    patterns of a layer cost one sweep each and no factorisation. Blocks are ``blocksize``
    rounded down to a multiple of ``M`` (at least ``M``), so groups never straddle blocks.
    Returns ``(weights [out, in] float32, pruned [out, in] bool, relative error)``; every
    row-group of ``M`` has exactly ``M - N`` pruned entries.
    """
    pat = parse_pattern(pattern)
    _check_nm(W, pat)
    if H is not None and tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise InvalidInputError(f"H must be ({W.shape[1]}, {W.shape[1]}) for W of shape {tuple(W.shape)}; got {tuple(H.shape)}")
    out, d = W.shape
    if factor is None:
        factor = inverse_factor(H, damp)
    U = factor.U
    dead_np = np.ascontiguousarray(factor.dead.numpy())
    bs = max(pat.m, (blocksize // pat.m) * pat.m)
    WT = W.detach().to(torch.float32).t().contiguous()  # [d, out]
    MT = torch.zeros((d, out), dtype=torch.bool)
    loss = np.zeros(out, dtype=np.float64)
    for i1 in range(0, d, bs):
        i2 = min(d, i1 + bs)
        W1 = WT[i1:i2]
        M1 = MT[i1:i2]
        E1 = torch.empty((i2 - i1, out), dtype=torch.float32)
        with _numba_threads_like_torch():
            sweep_block_nm(W1.numpy(), M1.numpy(), U[i1:i2, i1:i2].contiguous().numpy(), E1.numpy(), loss,
                           pat.n, pat.m, dead_np[i1:i2])
        if i2 < d:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)
    weights = WT.t().contiguous()
    pruned = MT.t().contiguous()
    err = _sweep_errors(W, H, [weights], np.array([loss.sum()]), factor)
    return weights, pruned, float(err[0])


def exact(
    W: torch.Tensor,
    H: torch.Tensor,
    pruned: torch.Tensor,
    damp: float = 0.0,
) -> torch.Tensor:
    """Per-row least squares over the kept weights for given masks ``pruned [S, out, in]``.

    Row ``r`` of level ``s`` with kept inputs ``K`` solves ``(H_KK + λI) w_K = ((H + λI) w0)_K``
    (``λ = damp * mean(diag H)``; dead inputs get diagonal 1 so their kept weights keep their
    value). Every system is factored by Cholesky in float64 (Numba, systems in parallel,
    see ``_kernels.solve_kept_rows``); a system that is not positive definite (a singular
    ``H_KK``) is solved by ``lstsq`` instead.
    """
    if pruned.ndim != 3 or tuple(pruned.shape[1:]) != tuple(W.shape):
        raise InvalidInputError(f"masks must be [levels, {W.shape[0]}, {W.shape[1]}]; got {tuple(pruned.shape)}")
    S, out, d = pruned.shape
    Hd, _dead, _lam = damped_hessian(H, damp)
    # Right-hand sides (Hd w0) for every row. A dead input has 1 on its diagonal and 0 elsewhere
    # in Hd, so G_dead = w0_dead: a kept dead weight keeps its value.
    G = (W.detach().to(torch.float64) @ Hd).numpy()
    Hn = Hd.numpy()
    keep = (~pruned).reshape(S * out, d).numpy()
    counts = keep.sum(1).astype(np.int64)
    starts = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=starts[1:])
    cols = np.nonzero(keep)[1].astype(np.int64)  # row-major: each row's kept columns, ascending
    rows = np.tile(np.arange(out, dtype=np.int64), S)
    order = np.argsort(-counts, kind="stable").astype(np.int64)  # largest systems first
    result = np.zeros((S * out, d), dtype=np.float32)
    ok = np.ones(S * out, dtype=np.bool_)
    before = numba.get_parallel_chunksize()
    numba.set_parallel_chunksize(1)  # dynamic scheduling: systems differ a lot in size
    try:
        with _numba_threads_like_torch():
            solve_kept_rows(Hn, G, cols, starts, counts, rows, order, result, ok)
    finally:
        numba.set_parallel_chunksize(before)
    bad = np.flatnonzero(~ok)
    if len(bad):
        log.debug("%d singular least-squares systems: solving them with lstsq", len(bad))
        for t in bad:
            K = cols[starts[t] : starts[t] + counts[t]]
            A = torch.from_numpy(Hn[np.ix_(K, K)])
            b = torch.from_numpy(G[rows[t], K]).unsqueeze(1)
            result[t] = 0.0
            result[t, K] = torch.linalg.lstsq(A, b, driver="gelsd").solution.squeeze(1).numpy()
    return torch.from_numpy(result).view(S, out, d)


def reconstruct(
    method: str,
    W: torch.Tensor,
    H: torch.Tensor,
    sparsities: np.ndarray,
    damp: float | None = None,
    blocksize: int = 128,
    patterns: Sequence[str] = (),
) -> Reconstruction:
    """Every level of one layer with ``method`` (``obs``, ``exact`` or ``magnitude``) and its errors,
    plus each N:M pattern in ``patterns`` the layer can hold (see the module doc)."""
    if method not in METHODS:
        raise InvalidInputError(f"unknown reconstruction method {method!r}; expected one of {', '.join(METHODS)}")
    _check(W, H, sparsities)
    if damp is None:
        damp = DEFAULT_DAMP[method]
    if not (math.isfinite(damp) and damp >= 0):
        raise InvalidInputError(f"damp must be a finite number >= 0 (a fraction of the mean diagonal of H); got {damp!r}")
    W = W.detach().to(torch.float32)
    sp = np.asarray(sparsities, dtype=np.float64)
    pats = [parse_pattern(p) for p in patterns]
    factor = None
    if method == "magnitude":
        weights, pruned = magnitude(W, sp)
        errors = relative_errors(W, weights, H)
    else:
        sweep_damp = damp if method == "obs" else DEFAULT_DAMP["obs"]
        factor = inverse_factor(H, sweep_damp)
        weights, pruned, errors = obs(W, H, sp, damp=sweep_damp, blocksize=blocksize, factor=factor)
        if method == "exact":
            sparse = torch.from_numpy(sp > 0)
            weights[sparse] = exact(W, H, pruned[sparse], damp=damp)
            errors = relative_errors(W, weights, H)
    rec = Reconstruction(weights=weights, pruned=pruned, errors=errors, patterns=tuple(p.name for p in pats))
    for pat in pats:
        why = pat.why_not(int(W.shape[1]))
        if why:
            rec.pattern_weights.append(None)
            rec.pattern_pruned.append(None)
            rec.pattern_errors.append(None)
            rec.pattern_skipped.append(why)
            continue
        if method == "magnitude":
            w_p, m_p = magnitude_nm(W, pat)
            e_p = float(relative_errors(W, w_p.unsqueeze(0), H)[0])
        else:
            w_p, m_p, e_p = obs_nm(W, H, pat, blocksize=blocksize, factor=factor)
            if method == "exact":
                w_p = exact(W, H, m_p.unsqueeze(0), damp=damp)[0]
                e_p = float(relative_errors(W, w_p.unsqueeze(0), H)[0])
        rec.pattern_weights.append(w_p)
        rec.pattern_pruned.append(m_p)
        rec.pattern_errors.append(e_p)
        rec.pattern_skipped.append(None)
    return rec

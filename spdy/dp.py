"""The SPDY dynamic-programming solver (paper Algorithm 1), in Numba.

Given per-layer times ``t[l][s]`` and error scores ``e[l][s]`` over the columns of a
:class:`~spdy.types.LatencyTable` (the levels of a sparsity grid, and N:M patterns where
the table has them), pick one column per layer that minimises ``sum e`` subject to
``base + sum t <= T_dense_total / speedup``. Time is discretised into buckets of
width ``budget / buckets`` and every layer time is rounded **up**, so the chosen
profile never exceeds the budget under the additive latency model. A time of ``+inf``
marks a choice a layer does not have; it is never picked. :func:`prior_errors` is
SPDY's error prior over the columns.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numba
import numpy as np

from spdy.errors import InfeasibleBudgetError, InvalidInputError
from spdy.types import LatencyTable, Solution

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = 10_000


@numba.njit(cache=True, boundscheck=False)
def _pareto_mask(T: np.ndarray, E: np.ndarray) -> np.ndarray:
    """keep[l, s] is False where another level of layer l is no slower and no worse.

    A dominated level never needs to be chosen: swapping it for its dominator keeps
    the profile feasible and its error no larger. Ties keep the lowest index.
    """
    L, S = T.shape
    keep = np.ones((L, S), dtype=np.bool_)
    for l in range(L):
        for s in range(S):
            for r in range(S):
                if r != s and T[l, r] <= T[l, s] and E[l, r] <= E[l, s]:
                    if T[l, r] < T[l, s] or E[l, r] < E[l, s] or r < s:
                        keep[l, s] = False
                        break
    return keep


@numba.njit(cache=True, boundscheck=False)
def _dp_kernel(T: np.ndarray, E: np.ndarray, B: int) -> tuple[np.ndarray, float]:
    """Algorithm 1 of SPDY over integer times.

    T[l, s]: time of layer l at level s in buckets (int64, >= 0); E[l, s]: error score;
    B: budget in buckets. D[l, t] is the least summed error of layers 0..l using exactly
    t buckets (equation 2). The forward pass is a pure min so that LLVM vectorises it;
    instead of a choice matrix P, the backward pass finds the level whose
    ``D[l-1, t - T[l, s]] + E[l, s]`` reproduces ``D[l, t]`` bit for bit (same float
    operation, same operands). Returns the levels and the optimum; ``levels[0] == -1``
    when nothing fits.
    """
    L, S = T.shape
    INF = np.inf
    keep = _pareto_mask(T, E)
    D = np.empty((L, B + 1))
    levels = np.full(L, -1, dtype=np.int64)
    lo = np.zeros(L, dtype=np.int64)  # D[l] is +inf outside [lo[l], hi[l]]
    hi = np.zeros(L, dtype=np.int64)
    D0 = D[0]
    D0[:] = INF
    lo[0] = B + 1
    hi[0] = -1
    for s in range(S):
        ts = T[0, s]
        if ts <= B:
            if E[0, s] < D0[ts]:
                D0[ts] = E[0, s]
            lo[0] = min(lo[0], ts)
            hi[0] = max(hi[0], ts)
    if hi[0] < 0:
        return levels, INF
    for l in range(1, L):
        Dp = D[l - 1]
        Dl = D[l]
        Dl[:] = INF
        nlo = B + 1
        nhi = -1
        for s in range(S):
            if not keep[l, s]:
                continue
            ts = T[l, s]
            start = lo[l - 1] + ts
            stop = min(B, hi[l - 1] + ts)
            if start > stop:
                continue
            nlo = min(nlo, start)
            nhi = max(nhi, stop)
            e = E[l, s]
            dst = Dl[start : stop + 1]
            src = Dp[start - ts : stop + 1 - ts]
            for k in range(stop + 1 - start):  # this form vectorises (masked stores)
                v = src[k] + e
                if v < dst[k]:
                    dst[k] = v
        if nhi < 0:
            return levels, INF
        lo[l] = nlo
        hi[l] = nhi
    DL = D[L - 1]
    best_t = -1
    best = INF
    for t in range(lo[L - 1], hi[L - 1] + 1):
        if DL[t] < best:
            best = DL[t]
            best_t = t
    if best_t < 0:
        return levels, INF
    t = best_t
    for l in range(L - 1, 0, -1):
        target = D[l, t]
        for s in range(S):
            ts = T[l, s]
            if ts <= t and D[l - 1, t - ts] + E[l, s] == target:
                levels[l] = s
                t -= ts
                break
    for s in range(S):
        if T[0, s] == t and E[0, s] == D[0, t]:
            levels[0] = s
            break
    return levels, best


def dp_numpy(T: np.ndarray, E: np.ndarray, B: int) -> tuple[np.ndarray, float]:
    """The same DP as straightforward vectorised numpy (the benchmark's reference).

    Per layer, a levels x buckets candidate matrix; argmin over levels gives the choice.
    """
    L, S = T.shape
    cols = np.arange(B + 1)
    P = np.full((L, B + 1), -1, dtype=np.int64)
    D = np.full(B + 1, np.inf)
    for s in range(S):
        if T[0, s] <= B and E[0, s] < D[T[0, s]]:
            D[T[0, s]] = E[0, s]
            P[0, T[0, s]] = s
    for l in range(1, L):
        cand = np.full((S, B + 1), np.inf)
        for s in range(S):
            ts = int(T[l, s])
            if ts <= B:
                cand[s, ts:] = D[: B + 1 - ts] + E[l, s]
        P[l] = np.argmin(cand, axis=0)
        D = cand[P[l], cols]
    t = int(np.argmin(D))
    if not np.isfinite(D[t]):
        return np.full(L, -1, dtype=np.int64), float("inf")
    best = float(D[t])
    levels = np.empty(L, dtype=np.int64)
    for l in range(L - 1, -1, -1):
        levels[l] = P[l, t]
        t -= int(T[l, levels[l]])
    return levels, best


def to_buckets(times: np.ndarray, budget: float, buckets: int) -> np.ndarray:
    """Layer times in buckets of width ``budget / buckets``, rounded up.

    A quotient within 1e-9 (relative) of an integer counts as that integer, so a
    profile whose time sums exactly to the budget stays feasible despite float noise.
    """
    q = np.asarray(times, dtype=np.float64) * (buckets / budget)
    k = np.ceil(q)
    k = np.where(k - q > 1 - 1e-9 * np.maximum(1.0, q), k - 1, k)
    return np.maximum(k, 0).astype(np.int64)


def prior_errors(
    n_layers: int, n_levels: int, coefficients: np.ndarray | None = None, positions: np.ndarray | None = None
) -> np.ndarray:
    """SPDY's error prior ``e[l][c] = c_l * (pos_c / (|S| - 1))^2`` (all ``c_l = 1`` by default).

    ``n_levels`` is the grid's size ``|S|``; ``positions`` the grid position of each column,
    ``[C]`` or ``[L, C]`` (default: the grid's levels, ``0 .. |S| - 1``). A table's own are
    :meth:`LatencyTable.positions`: an N:M column sits at its sparsity's fractional position
    on the grid, so under the prior it counts as damaging as unstructured pruning to the same
    sparsity; the search's coefficients and the calibration loss of the stitched model (its
    real N:M weights) correct for the difference. :func:`error_equivalent_positions` places
    it where the layer's reconstruction errors say instead.
    """
    c = np.ones(n_layers) if coefficients is None else np.asarray(coefficients, dtype=np.float64)
    if c.shape != (n_layers,):
        raise InvalidInputError(f"expected {n_layers} sensitivity coefficients; got shape {c.shape}")
    pos = np.arange(n_levels, dtype=np.float64) if positions is None else np.asarray(positions, dtype=np.float64)
    if not (pos.ndim == 1 or (pos.ndim == 2 and pos.shape[0] == n_layers)) or not np.all(np.isfinite(pos)):
        raise InvalidInputError(f"positions must be finite, of shape (columns,) or ({n_layers}, columns); got {pos.shape}")
    ramp = (pos / max(n_levels - 1, 1)) ** 2
    return c[:, None] * np.broadcast_to(ramp, (n_layers, pos.shape[-1]))


def error_equivalent_positions(table: LatencyTable, database: Any) -> np.ndarray:
    """``[L, C]`` positions (for :func:`prior_errors`) that put each N:M column at the grid
    position whose unstructured reconstruction error (interpolated over the database's
    levels) equals the layer's N:M error.

    E.g. a layer whose 2:4 error matches its unstructured error at 62 % gets 2:4 at 62 %'s
    position. Other columns keep :meth:`LatencyTable.positions`; so do layers without the
    pattern (the DP never picks them anyway).
    """
    base = np.broadcast_to(table.positions(), table.times.shape).copy()
    idx = {n: i for i, n in enumerate(database.layers)}
    S = len(table.grid)
    for c, ch in enumerate(table.choices):
        if not ch.is_nm or ch.pattern not in database.patterns:
            continue
        k = database.patterns.index(ch.pattern)
        for l, name in enumerate(table.layers):
            i = idx[name]
            e_nm = database.pattern_errors[i, k]
            curve = np.maximum.accumulate(np.nan_to_num(database.errors[i], nan=np.inf))  # monotone for interp
            if not np.isfinite(e_nm) or not np.all(np.isfinite(curve)):
                continue
            base[l, c] = float(np.interp(e_nm, curve, np.arange(S, dtype=np.float64)))
    return base


def parse_speedup(value: str | float) -> float:
    """The one check of a speedup target: ``2.5x``, ``2.5X``, ``"2.5"`` or a number, finite and > 1.

    Every entry point (the CLI, :func:`spdy.search`, :func:`solve`, the search's config)
    checks its target here, so a bad one always gets the same message.
    """
    if isinstance(value, str):
        text = value.strip()
        raw = text[:-1] if text[-1:] in ("x", "X") else text
    else:
        raw = value
    try:
        s = float(raw)
    except (TypeError, ValueError):
        s = math.nan
    if not math.isfinite(s) or s <= 1.0:
        raise InvalidInputError(
            f"speedup must be a number greater than 1, such as 1.5x or 2; got {value!r} (1x is the dense model)"
        )
    return s


def _check_errors(errors: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    e = np.asarray(errors, dtype=np.float64)
    if e.shape != shape:
        raise InvalidInputError(f"error scores have shape {e.shape}; expected {shape} (layers x levels, as the timings)")
    if not np.all(np.isfinite(e)):
        bad = np.argwhere(~np.isfinite(e))[0]
        raise InvalidInputError(f"error scores hold a non-finite value at layer {bad[0]}, level {bad[1]}")
    return np.ascontiguousarray(e)


def solve_budget(
    times: np.ndarray,
    errors: np.ndarray,
    budget: float,
    buckets: int = DEFAULT_BUCKETS,
    *,
    allow_unavailable: bool = False,
) -> tuple[np.ndarray, float]:
    """Levels minimising summed error with ``sum times[l, level_l] <= budget``.

    With ``allow_unavailable``, a time of ``+inf`` marks a choice the layer does not have
    (e.g. an N:M pattern without a kernel, see :class:`LatencyTable`): it is never picked
    (its bucket count exceeds the budget); every layer needs one finite time.

    Returns ``(levels, total_error)``; raises :class:`InfeasibleBudgetError` if no choice fits.
    """
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise InvalidInputError(f"times must be a non-empty layers x levels table; got shape {t.shape}")
    unavailable = np.isposinf(t) if allow_unavailable else np.zeros(t.shape, dtype=bool)
    if np.any(t[~unavailable] < 0) or not np.all(np.isfinite(t[~unavailable])):
        raise InvalidInputError("times must be finite and >= 0" + (" (or +inf: unavailable)" if allow_unavailable else ""))
    if unavailable.all(axis=1).any():
        bad = int(np.flatnonzero(unavailable.all(axis=1))[0])
        raise InvalidInputError(f"layer {bad} has no available choice (every time is +inf); give it at least dense")
    if unavailable.any():
        t = np.where(unavailable, 0.0, t)
    e = _check_errors(errors, t.shape)
    if not isinstance(buckets, (int, np.integer)) or buckets < 1:
        raise InvalidInputError(f"buckets must be a positive integer; got {buckets!r}")
    if buckets * t.shape[0] > 200_000_000:
        raise InvalidInputError(
            f"buckets={buckets} for {t.shape[0]} layers needs {buckets * t.shape[0] * 8 / 2**30:.1f} GiB; "
            "the DP keeps layers x buckets float64 values: use fewer buckets (10,000 is the paper's choice)"
        )
    fastest = float(np.where(unavailable, np.inf, t).min(axis=1).sum())
    if not budget > 0 or fastest > budget * (1 + 1e-12):
        raise InfeasibleBudgetError(
            f"no profile fits a layer-time budget of {budget:.6g} s: the fastest level of every layer sums to {fastest:.6g} s"
        )
    T = to_buckets(t, budget, int(buckets))
    T[unavailable] = int(buckets) + 1  # over the budget on its own: the kernel never picks it
    levels, best = _dp_kernel(np.ascontiguousarray(T), e, int(buckets))
    if levels[0] < 0:
        raise InfeasibleBudgetError(
            f"the budget fits in real time ({fastest:.6g} s <= {budget:.6g} s) but not after rounding each of "
            f"{t.shape[0]} layer times up to {buckets} buckets; use more buckets (e.g. --buckets {buckets * 10})"
        )
    return levels, float(best)


def solve_table(table: LatencyTable, errors: np.ndarray, budget: float, buckets: int = DEFAULT_BUCKETS
                ) -> tuple[np.ndarray, float]:
    """:func:`solve_budget` over ``table``'s columns (``+inf`` = unavailable), with its fused pairs.

    A fused pair (:class:`~spdy.types.FusedPair`) saves time only when both its layers fuse, so
    its two layers enter the DP as one layer whose choices are all pairs of their columns (time
    :meth:`LatencyTable.pair_times`, error the sum); the answer is split back per layer. A
    pair's times can fall below zero (the saving includes base work), so each merged layer's
    times are shifted up to start at zero and the budget by the same amount: the optimum is the
    same. ``budget`` is the layers' time (the base excluded), as for :func:`solve_budget`.
    """
    if not table.fused:
        return solve_budget(table.times, errors, budget, buckets, allow_unavailable=True)
    e = np.asarray(errors, dtype=np.float64)
    L, C = table.times.shape
    paired = {i for p in table.fused for i in (p.first, p.second)}
    alone = [i for i in range(L) if i not in paired]
    width = C * C
    T = np.full((len(alone) + len(table.fused), width), np.inf)
    E = np.zeros(T.shape)
    T[:len(alone), :C] = table.times[alone]
    E[:len(alone), :C] = e[alone]
    shift = 0.0
    for k, p in enumerate(table.fused):
        t = table.pair_times(p).ravel()
        low = float(t[np.isfinite(t)].min())
        if low < 0:
            t = t - low
            shift -= low
        T[len(alone) + k] = t
        E[len(alone) + k] = (e[p.first][:, None] + e[p.second][None, :]).ravel()
    E[~np.isfinite(T)] = 0.0
    merged, total = solve_budget(T, E, budget + shift, buckets, allow_unavailable=True)
    levels = np.empty(L, dtype=np.int64)
    levels[alone] = merged[:len(alone)]
    for k, p in enumerate(table.fused):
        levels[p.first], levels[p.second] = divmod(int(merged[len(alone) + k]), C)
    return levels, total


def _table_errors(table: LatencyTable, errors: np.ndarray) -> np.ndarray:
    """``errors`` checked against ``table``: one finite score per choice a layer has; the
    scores of choices it does not have (any value, NaN too) become 0, never picked."""
    e = np.array(errors, dtype=np.float64)
    if e.shape != table.times.shape:
        raise InvalidInputError(f"error scores have shape {e.shape}; expected {table.times.shape} (layers x levels, "
                                "as the timings)")
    avail = table.available
    bad = avail & ~np.isfinite(e)
    if bad.any():
        i, c = np.argwhere(bad)[0]
        raise InvalidInputError(f"error scores hold a non-finite value ({e[i, c]}) at layer {i} ({table.layers[i]!r}), "
                                f"level {c} ({table.choices[c].label}); every choice a layer has needs a finite score")
    e[~avail] = 0.0
    return e


def solve(table: LatencyTable, errors: np.ndarray, speedup: float, buckets: int = DEFAULT_BUCKETS) -> Solution:
    """The least-error choice per layer for ``speedup`` over the dense model, counting every layer and the base time.

    ``errors`` is ``[L, C]`` like the table's times (e.g. :func:`prior_errors`); scores of
    the choices a layer does not have (``+inf`` time) are ignored. Raises
    :class:`InfeasibleBudgetError` with the largest reachable speedup when even the
    fastest choices are too slow.
    """
    speedup = parse_speedup(speedup)
    e = _table_errors(table, errors)
    budget = table.budget_for(speedup)
    max_speedup = table.max_speedup()
    # the layers' budget may be below zero where fused pairs save more than their own time (the
    # saving includes base work): only the fastest choices decide what is in reach
    if table.fastest_total_s() - table.base_s > budget + abs(budget) * 1e-12:
        raise InfeasibleBudgetError(
            f"a {speedup:g}x speedup is out of reach: with every layer at its fastest level the model takes "
            f"{table.fastest_total_s():.6g} s of {table.dense_total_s:.6g} s dense "
            f"(base time {table.base_s:.6g} s is not prunable), so the largest reachable speedup is {max_speedup:.3f}x. "
            "Ask for less, or exclude fewer layers.",
            max_speedup=max_speedup,
        )
    t0 = time.perf_counter()
    levels, total = solve_table(table, e, budget, buckets)
    return table.solution(levels, total, (time.perf_counter() - t0) * 1e3)


def warmup() -> float:
    """Compile (or load from cache) the kernel; returns the seconds it took."""
    t0 = time.perf_counter()
    _dp_kernel(np.zeros((1, 1), dtype=np.int64), np.zeros((1, 1)), 1)
    return time.perf_counter() - t0

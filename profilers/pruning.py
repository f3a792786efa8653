"""Weights at a sparsity level, for timing only.

The profiler needs weights with the right number (and a plausible pattern) of
zeros; their values do not matter. Magnitude pruning of the layer's real weight
is used: for unstructured kernels the pattern changes the time little, and the
real weight keeps the row-length distribution the runtime will really see.
"""

from __future__ import annotations

import numpy as np

from spdy.errors import InvalidInputError


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights are zero at ``sparsity`` (rounded to nearest)."""
    if not 0.0 <= sparsity <= 1.0:
        raise InvalidInputError(f"sparsity must lie in [0, 1]; got {sparsity}")
    return int(round(sparsity * numel))


def magnitude_prune(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """A copy of ``weight`` with its ``sparsity`` fraction of smallest-magnitude entries set to 0."""
    w = np.array(weight, dtype=np.float32, copy=True)
    k = n_pruned(w.size, sparsity)
    if k <= 0:
        return w
    flat = w.reshape(-1)
    if k >= flat.size:
        flat[:] = 0
        return w
    idx = np.argpartition(np.abs(flat), k - 1)[:k]
    flat[idx] = 0
    return w


class LevelPruner:
    """Magnitude pruning of one weight to many levels: the order of ``|W|`` is computed once
    (levels are nested), so each level costs one copy and one scatter."""

    def __init__(self, weight: np.ndarray) -> None:
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self._order = np.argsort(np.abs(self.weight).reshape(-1), kind="stable")

    def at(self, sparsity: float) -> np.ndarray:
        k = n_pruned(self.weight.size, sparsity)
        if k <= 0:
            return self.weight
        w = self.weight.copy()
        w.reshape(-1)[self._order[:k]] = 0
        return w


def prune_n_m(weight: np.ndarray, sparsity: float, n: int = 2, m: int = 4) -> np.ndarray:
    """Magnitude pruning that keeps at most ``n`` of every ``m`` consecutive input weights
    (the N:M semi-structured pattern), then prunes further to ``sparsity`` if it exceeds 1 - n/m.

    The weight is viewed as a GEMM operand (out, in...) and groups run along the input dim.
    """
    w = np.array(weight, dtype=np.float32, copy=True)
    rows = w.reshape(w.shape[0], -1)
    if rows.shape[1] % m:
        raise InvalidInputError(f"N:M pruning needs the input size ({rows.shape[1]}) to be a multiple of m={m}")
    groups = rows.reshape(rows.shape[0], -1, m)
    order = np.argsort(np.abs(groups), axis=-1)
    mask = np.ones_like(groups, dtype=bool)
    np.put_along_axis(mask, order[..., : m - n], False, axis=-1)
    groups = np.where(mask, groups, 0.0).astype(np.float32)
    pruned = groups.reshape(w.shape)
    if sparsity > 1.0 - n / m:
        # more zeros among the kept weights: the pattern stays N:M-valid
        extra = n_pruned(pruned.size, sparsity) - int((pruned == 0).sum())
        if extra > 0:
            flat = pruned.reshape(-1)
            nz = np.flatnonzero(flat)
            drop = nz[np.argpartition(np.abs(flat[nz]), extra - 1)[:extra]]
            flat[drop] = 0
    return pruned


def random_level_vectors(n_layers: int, n_levels: int, k: int, seed: int = 0) -> np.ndarray:
    """``k`` random profiles: one level index per layer, uniform over the grid. Shape [k, n_layers]."""
    if k < 0 or n_layers < 1 or n_levels < 1:
        raise InvalidInputError(f"need k >= 0, n_layers >= 1, n_levels >= 1; got {k}, {n_layers}, {n_levels}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_levels, size=(k, n_layers))

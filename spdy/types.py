"""Frozen dataclasses that flow between the stages (profiler, database, DP, search).

Shapes and finiteness are validated once, at construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spdy.errors import InvalidInputError
from spdy.grid import SparsityGrid


@dataclass(frozen=True)
class LayerSpec:
    """A prunable layer: where it is, what it is, and the input it really sees.

    ``input_shape`` is the shape of the layer's input on the model's example
    (deployment-shaped) batch, e.g. ``(1, 128, 384)`` for a MiniLM Linear or
    ``(1, 64, 56, 56)`` for a Conv2d.
    """

    name: str
    kind: str  # "linear" | "conv2d"
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    has_bias: bool = True
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "conv2d"):
            raise InvalidInputError(f"layer {self.name!r}: kind must be 'linear' or 'conv2d'; got {self.kind!r}")
        want = 2 if self.kind == "linear" else 4
        if len(self.weight_shape) != want:
            raise InvalidInputError(
                f"layer {self.name!r}: a {self.kind} weight has {want} dims; got shape {self.weight_shape}"
            )

    @property
    def numel(self) -> int:
        return int(np.prod(self.weight_shape))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The weight as a GEMM operand: (out, in) for Linear, (out, in*kh*kw) for Conv2d."""
        return (self.weight_shape[0], int(np.prod(self.weight_shape[1:])))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "weight_shape": list(self.weight_shape),
            "input_shape": list(self.input_shape),
            "has_bias": self.has_bias,
        }
        if self.kind == "conv2d":
            d.update(stride=list(self.stride), padding=list(self.padding), dilation=list(self.dilation))
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LayerSpec":
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            weight_shape=tuple(int(x) for x in d["weight_shape"]),
            input_shape=tuple(int(x) for x in d["input_shape"]),
            has_bias=bool(d.get("has_bias", True)),
            stride=tuple(d.get("stride", (1, 1))),  # type: ignore[arg-type]
            padding=tuple(d.get("padding", (0, 0))),  # type: ignore[arg-type]
            dilation=tuple(d.get("dilation", (1, 1))),  # type: ignore[arg-type]
        )


def _as_table(name: str, values: Any, n_layers: int | None = None, n_levels: int | None = None) -> np.ndarray:
    try:
        arr = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be a numeric layers x levels table; got {type(values).__name__}") from exc
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be 2-D (layers x levels); got shape {arr.shape}")
    if n_layers is not None and arr.shape[0] != n_layers:
        raise InvalidInputError(f"{name} has {arr.shape[0]} layers; expected {n_layers}")
    if n_levels is not None and arr.shape[1] != n_levels:
        raise InvalidInputError(f"{name} has {arr.shape[1]} levels per layer; expected {n_levels} (the grid's size)")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise InvalidInputError(f"{name} holds a non-finite value at layer {bad[0]}, level {bad[1]}: {arr[tuple(bad)]}")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class LatencyTable:
    """Seconds per layer and level, plus the time of everything that is not prunable.

    ``base_s`` is the measured time of the rest of the model (attention, norms,
    activations, excluded layers), so that ``base_s + sum(times[l, s_l])``
    predicts the whole model's time.
    """

    layers: tuple[str, ...]
    grid: SparsityGrid
    times: np.ndarray  # [L, S] seconds
    base_s: float
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise InvalidInputError("a latency table needs at least one layer; got none")
        if len(set(self.layers)) != len(self.layers):
            raise InvalidInputError("layer names in a latency table must be unique")
        t = _as_table("times", self.times, len(self.layers), len(self.grid))
        if np.any(t < 0):
            bad = np.argwhere(t < 0)[0]
            raise InvalidInputError(f"times must be >= 0; layer {self.layers[bad[0]]!r} level {bad[1]} is {t[tuple(bad)]}")
        object.__setattr__(self, "times", t)
        base = float(self.base_s)
        if not np.isfinite(base) or base < 0:
            raise InvalidInputError(f"base time must be a finite number >= 0 seconds; got {self.base_s!r}")
        object.__setattr__(self, "base_s", base)

    @property
    def dense_total_s(self) -> float:
        """Predicted time of the dense model: base plus every layer at level 0."""
        return self.base_s + float(self.times[:, 0].sum())

    def budget_for(self, speedup: float) -> float:
        """Time left for the prunable layers: ``T_dense_total / speedup - T_base``."""
        return self.dense_total_s / speedup - self.base_s

    def predicted_time(self, levels: np.ndarray) -> float:
        lv = np.asarray(levels, dtype=np.int64)
        return self.base_s + float(self.times[np.arange(len(self.layers)), lv].sum())

    def max_speedup(self) -> float:
        return self.dense_total_s / (self.base_s + float(self.times.min(axis=1).sum()))


@dataclass(frozen=True)
class Solution:
    """A DP answer: the level index chosen per layer and what it costs."""

    layers: tuple[str, ...]
    levels: np.ndarray  # [L] int
    sparsities: np.ndarray  # [L] float
    predicted_time_s: float  # base + layer times (the additive latency model)
    predicted_speedup: float
    total_error: float
    solve_ms: float = float("nan")

    def __post_init__(self) -> None:
        lv = np.asarray(self.levels, dtype=np.int64)
        sp = np.asarray(self.sparsities, dtype=np.float64)
        if lv.shape != (len(self.layers),) or sp.shape != lv.shape:
            raise InvalidInputError(
                f"a solution needs one level per layer: {len(self.layers)} layers, levels {lv.shape}, sparsities {sp.shape}"
            )
        lv.setflags(write=False)
        sp.setflags(write=False)
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "levels", lv)
        object.__setattr__(self, "sparsities", sp)

    def as_dict(self) -> dict[str, float]:
        """Layer name -> sparsity."""
        return {n: float(s) for n, s in zip(self.layers, self.sparsities)}

    def to_json(self) -> dict[str, Any]:
        return {
            "levels": self.as_dict(),
            "level_index": {n: int(i) for n, i in zip(self.layers, self.levels)},
            "predicted_time_s": self.predicted_time_s,
            "predicted_speedup": self.predicted_speedup,
            "total_error": self.total_error,
            "solve_ms": self.solve_ms,
        }

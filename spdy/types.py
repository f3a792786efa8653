"""Frozen dataclasses that flow between the stages (profiler, database, DP, search).

Shapes and finiteness are validated once, at construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spdy.choices import UNSTRUCTURED, Choice, grid_choices, grid_position
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


def _as_table(name: str, values: Any, n_layers: int, n_columns: int) -> np.ndarray:
    """``values`` as a read-only float ``[n_layers, n_columns]`` array without NaN (``+inf`` stays)."""
    try:
        arr = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be a numeric layers x levels table; got {type(values).__name__}") from exc
    if arr.ndim != 2:
        raise InvalidInputError(f"{name} must be 2-D (layers x levels); got shape {arr.shape}")
    if arr.shape[0] != n_layers:
        raise InvalidInputError(f"{name} has {arr.shape[0]} layers; expected {n_layers}")
    if arr.shape[1] != n_columns:
        raise InvalidInputError(f"{name} has {arr.shape[1]} levels per layer; expected {n_columns} (one per "
                                "choice: the grid's levels, then any N:M patterns)")
    if np.any(np.isnan(arr)):
        bad = np.argwhere(np.isnan(arr))[0]
        raise InvalidInputError(f"{name} holds a non-finite value at layer {bad[0]}, level {bad[1]}: nan "
                                "(+inf marks a choice the layer does not have)")
    arr.setflags(write=False)
    return arr


FUSED_FORMATS: tuple[str, ...] = ("csr", "bcsr1x4", "bcsr4x1")
"""Kernel formats whose layers the runtime can chain in the tile layout (:class:`FusedPair`)."""


@dataclass(frozen=True)
class FusedPair:
    """Two layers the runtime runs as one fused block when both run a :data:`FUSED_FORMATS`
    format (a transformer's feed-forward: up projection, GELU, down projection, residual).

    ``first`` and ``second`` index the table's layers; ``saving_s`` is what the fused block
    saves per pass against the two layers' own times plus the GELU and the residual in the base.
    """

    first: int
    second: int
    saving_s: float

    def to_json(self, layers: Sequence[str]) -> dict[str, Any]:
        return {"first": layers[self.first], "second": layers[self.second], "saving_s": self.saving_s}

    @classmethod
    def from_json(cls, d: dict[str, Any], layers: Sequence[str]) -> "FusedPair":
        names = list(layers)
        for k in ("first", "second"):
            if d.get(k) not in names:
                raise InvalidInputError(f"fused pair names layer {d.get(k)!r}, which the table does not have")
        return cls(names.index(d["first"]), names.index(d["second"]), float(d["saving_s"]))


@dataclass(frozen=True)
class PlannedLayer:
    """A transformer layer's six projections that the runtime runs faster still when all six are in
    a :data:`FUSED_FORMATS` format (a BERT encoder layer run from a plan of its fused parts' kernel
    calls, :class:`spdy.runtime.EncoderForward`).

    ``members`` index the table's layers in the order query, key, value, attention output,
    feed-forward up, feed-forward down. ``share_s`` is a third of what the plan saves per pass. So
    that the DP, which adds layers up one by one, sees the saving, the table credits ``share_s`` to
    each of the layer's three fused groups where that group fuses: the feed-forward pair's saving
    holds it, a third of it is off each of the query, key and value times, all of it off the
    attention output's. Where the six do not all fuse the plan saves nothing, and
    :meth:`LatencyTable.predicted_time` takes those credits back (:meth:`taken_back`).
    """

    members: tuple[int, int, int, int, int, int]
    share_s: float

    def taken_back(self, fuses: Sequence[bool], whole_triple: bool = False) -> float:
        """What the table credited this layer but the runtime does not save, given whether each of
        the six ``members`` runs a format that fuses (in their order). ``whole_triple``: the query,
        key and value were credited the share together, only where all three fuse (the in-model
        fit's count), not a third each."""
        q, k, v, o, up, down = (bool(f) for f in fuses)
        if q and k and v and o and up and down:
            return 0.0
        qkv = float(q and k and v) if whole_triple else (q + k + v) / 3
        return self.share_s * (qkv + o + (up and down))

    def to_json(self, layers: Sequence[str]) -> dict[str, Any]:
        return {"members": [layers[i] for i in self.members], "share_s": self.share_s}

    @classmethod
    def from_json(cls, d: dict[str, Any], layers: Sequence[str]) -> "PlannedLayer":
        names = list(layers)
        members = d.get("members")
        if not isinstance(members, list) or len(members) != 6 or any(m not in names for m in members):
            raise InvalidInputError(f"a planned layer names six layers of the table; got {members!r}")
        return cls(tuple(names.index(m) for m in members), float(d["share_s"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class LatencyTable:
    """Seconds per layer and choice, plus the time of everything that is not prunable.

    ``base_s`` is the measured time of the rest of the model (attention, norms,
    activations, excluded layers), so that ``base_s + sum(times[l, c_l])``
    predicts the whole model's time.

    The columns are ``choices`` (:class:`~spdy.choices.Choice`), the same for every layer:
    by default the grid's levels (:func:`~spdy.choices.grid_choices`: column ``i`` is level
    ``i``); a table with N:M patterns (:func:`spdy.profile.choice_table`) has one more
    column per pattern. Column 0 is the dense choice. ``times[l, c]`` is ``+inf`` where
    layer ``l`` does not have choice ``c`` (no kernel on the backend, no weight in the
    database): the DP never picks it. ``formats`` (optional, ``[L][C]``) names the kernel
    format the backend runs each entry in (``""`` where unavailable).

    ``fused`` (:class:`FusedPair`, needs ``formats``): pairs of layers that run as one block
    when both are in a :data:`FUSED_FORMATS` format; the model's time is then less by the
    pair's ``saving_s``. No layer is in two pairs. The DP treats a pair as one layer whose
    choices are the pairs of the two layers' columns (:func:`spdy.dp.solve_table`).

    ``planned`` (:class:`PlannedLayer`, needs ``formats``): layers the runtime runs from a plan
    where all their projections fuse; their saving is credited in ``times`` and the pairs'
    savings, and taken back by :meth:`predicted_time` where they do not all fuse.
    """

    layers: tuple[str, ...]
    grid: SparsityGrid
    times: np.ndarray  # [L, C] seconds, +inf = unavailable
    base_s: float
    fingerprint: dict[str, Any] = field(default_factory=dict)
    choices: tuple[Choice, ...] = ()  # () = the grid's levels
    formats: tuple[tuple[str, ...], ...] | None = None
    fused: tuple[FusedPair, ...] = ()
    planned: tuple[PlannedLayer, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise InvalidInputError("a latency table needs at least one layer; got none")
        if len(set(self.layers)) != len(self.layers):
            raise InvalidInputError("layer names in a latency table must be unique")
        object.__setattr__(self, "choices", self._checked_choices())
        t = _as_table("times", self.times, len(self.layers), len(self.choices))
        if np.any(t < 0):
            bad = np.argwhere(t < 0)[0]
            raise InvalidInputError(f"times must be >= 0; layer {self.layers[bad[0]]!r} level {bad[1]} is {t[tuple(bad)]}")
        if not np.all(np.isfinite(t[:, 0])):
            bad = int(np.flatnonzero(~np.isfinite(t[:, 0]))[0])
            raise InvalidInputError(f"layer {self.layers[bad]!r} has no dense time; every layer must be able to stay dense")
        object.__setattr__(self, "times", t)
        base = float(self.base_s)
        if not np.isfinite(base) or base < 0:
            raise InvalidInputError(f"base time must be a finite number >= 0 seconds; got {self.base_s!r}")
        object.__setattr__(self, "base_s", base)
        if self.formats is not None:
            fm = tuple(tuple(str(f) for f in row) for row in self.formats)
            if len(fm) != len(self.layers) or any(len(row) != len(self.choices) for row in fm):
                raise InvalidInputError(f"formats must be {len(self.layers)} rows of {len(self.choices)} format names")
            object.__setattr__(self, "formats", fm)
        self._check_fused()

    def _check_fused(self) -> None:
        pairs = tuple(self.fused)
        object.__setattr__(self, "fused", pairs)
        L = len(self.layers)
        mask = np.zeros(self.times.shape, dtype=bool)
        if pairs:
            if self.formats is None:
                raise InvalidInputError("fused pairs need the table's formats: whether a pair fuses depends on them")
            seen: set[int] = set()
            for p in pairs:
                if not isinstance(p, FusedPair):
                    raise InvalidInputError(f"fused pairs are spdy.types.FusedPair values; got {type(p).__name__}")
                if not (0 <= p.first < L and 0 <= p.second < L) or p.first == p.second or {p.first, p.second} & seen:
                    raise InvalidInputError(f"fused pair ({p.first}, {p.second}) must name two distinct layers of the "
                                            f"table's {L}, none in another pair")
                if not (math.isfinite(p.saving_s) and p.saving_s >= 0):
                    raise InvalidInputError(f"a fused pair's saving must be finite and >= 0 seconds; got {p.saving_s!r}")
                seen |= {p.first, p.second}
        planned = tuple(self.planned)
        object.__setattr__(self, "planned", planned)
        if planned:
            if self.formats is None:
                raise InvalidInputError("planned layers need the table's formats: whether they fuse depends on them")
            for g in planned:
                if not isinstance(g, PlannedLayer):
                    raise InvalidInputError(f"planned layers are spdy.types.PlannedLayer values; got {type(g).__name__}")
                if len(g.members) != 6 or len(set(g.members)) != 6 or not all(0 <= i < L for i in g.members):
                    raise InvalidInputError(f"a planned layer names six distinct layers of the table's {L}; got {g.members}")
                if not (math.isfinite(g.share_s) and g.share_s >= 0):
                    raise InvalidInputError(f"a planned layer's share must be finite and >= 0 seconds; got {g.share_s!r}")
        if pairs or planned:
            mask = np.array([[f in FUSED_FORMATS for f in row] for row in self.formats], dtype=bool)
        object.__setattr__(self, "_fusable", mask)

    @property
    def fusable(self) -> np.ndarray:
        """``[L, C]`` bool: the entries whose format can fuse with a pair partner (all False without pairs)."""
        return self._fusable  # type: ignore[attr-defined, no-any-return]

    def fused_saving(self, levels: Sequence[int] | np.ndarray) -> float:
        """Seconds the fused pairs save with each layer at its column ``levels``."""
        if not self.fused:
            return 0.0
        f = self._fusable  # type: ignore[attr-defined]
        return float(sum(p.saving_s for p in self.fused if f[p.first, levels[p.first]] and f[p.second, levels[p.second]]))

    def pair_times(self, pair: FusedPair) -> np.ndarray:
        """``[C, C]`` predicted seconds of a pair's two layers at columns (a, b), the saving taken off
        where both fuse (may be below zero: part of the saving is the base's GELU and residual)."""
        t = self.times[pair.first][:, None] + self.times[pair.second][None, :]
        f = self._fusable  # type: ignore[attr-defined]
        return t - pair.saving_s * (f[pair.first][:, None] & f[pair.second][None, :])

    def _checked_choices(self) -> tuple[Choice, ...]:
        cols = tuple(self.choices) or grid_choices(self.grid)
        if any(not isinstance(c, Choice) for c in cols):
            raise InvalidInputError("the columns of a latency table are spdy.choices.Choice values")
        if not cols[0].is_dense:
            raise InvalidInputError(f"column 0 of a latency table must be the dense choice; got {cols[0]}")
        if len(set(cols)) != len(cols):
            raise InvalidInputError("the columns (choices) of a latency table must be unique")
        for c in cols:
            if c.pattern == UNSTRUCTURED and (c.level >= len(self.grid) or abs(self.grid[c.level] - c.sparsity) > 1e-9):
                raise InvalidInputError(f"choice {c} is not a level of the table's grid")
        return cols

    @property
    def available(self) -> np.ndarray:
        """``[L, C]`` bool: which choices each layer has."""
        return np.isfinite(self.times)

    @property
    def is_grid(self) -> bool:
        """Whether the columns are the grid's levels alone (column = level)."""
        return self.choices == grid_choices(self.grid)

    @property
    def dense_total_s(self) -> float:
        """Predicted time of the dense model: base plus every layer at level 0 (less what fused pairs
        save, where level 0 runs in a format that fuses)."""
        return self.predicted_time(np.zeros(len(self.layers), dtype=np.int64))

    def budget_for(self, speedup: float) -> float:
        """Time left for the prunable layers: ``T_dense_total / speedup - T_base``."""
        return self.dense_total_s / speedup - self.base_s

    def planned_taken_back(self, levels: Sequence[int] | np.ndarray) -> float:
        """Seconds credited to planned layers that the runtime does not save with each layer at its
        column ``levels`` (:meth:`PlannedLayer.taken_back`)."""
        if not self.planned:
            return 0.0
        f = self._fusable  # type: ignore[attr-defined]
        return float(sum(g.taken_back([f[i, levels[i]] for i in g.members]) for g in self.planned))

    def predicted_time(self, levels: Sequence[int] | np.ndarray) -> float:
        """Base plus each layer's time at its column, less what the fused pairs save (and what the
        planned layers save, where all their layers fuse)."""
        lv = np.asarray(levels, dtype=np.int64)
        return (self.base_s + float(self.times[np.arange(len(self.layers)), lv].sum()) - self.fused_saving(lv)
                + self.planned_taken_back(lv))

    def fastest_total_s(self) -> float:
        """Predicted time with every layer (every fused pair) at its fastest available choice."""
        if not self.fused:
            return self.base_s + float(self.times.min(axis=1).sum())
        paired = {i for p in self.fused for i in (p.first, p.second)}
        alone = [i for i in range(len(self.layers)) if i not in paired]
        return (self.base_s + float(self.times[alone].min(axis=1).sum())
                + sum(float(self.pair_times(p).min()) for p in self.fused))

    def max_speedup(self) -> float:
        fastest = self.fastest_total_s()
        return self.dense_total_s / fastest if fastest > 0 else math.inf

    def positions(self) -> np.ndarray:
        """``[C]`` grid positions of the columns (SPDY's prior, :func:`spdy.dp.prior_errors`): the
        level of a grid column, the fractional position of its sparsity for an N:M pattern."""
        return np.array([grid_position(self.grid, c.sparsity) if c.is_nm else float(c.level) for c in self.choices])

    def patterns(self) -> tuple[str, ...]:
        """The N:M patterns among the columns."""
        return tuple(c.pattern for c in self.choices if c.is_nm)

    def pattern_layers(self) -> dict[str, int]:
        """``{pattern: how many layers have it}`` for the N:M columns."""
        avail = self.available
        return {c.pattern: int(avail[:, k].sum()) for k, c in enumerate(self.choices) if c.is_nm}

    def column_of(self, choice: Choice) -> int:
        try:
            return self.choices.index(choice)
        except ValueError:
            raise InvalidInputError(f"choice {choice.label} is not a column of this table") from None

    def choices_of(self, columns: Sequence[int] | np.ndarray) -> dict[str, Choice]:
        """``{layer: Choice}`` for one column index per layer (what :meth:`Database.stitch` takes)."""
        col = np.asarray(columns, dtype=np.int64)
        if col.shape != (len(self.layers),):
            raise InvalidInputError(f"expected one column per layer ({len(self.layers)}); got shape {col.shape}")
        avail = self.available
        bad = [self.layers[i] for i, c in enumerate(col) if not (0 <= c < len(self.choices)) or not avail[i, c]]
        if bad:
            raise InvalidInputError(f"layers {bad[:5]} get a choice they do not have")
        return {n: self.choices[int(c)] for n, c in zip(self.layers, col)}

    def solution(self, columns: Sequence[int] | np.ndarray, total_error: float = math.nan,
                 solve_ms: float = math.nan) -> "Solution":
        """Each layer at its column, as a :class:`Solution` of this table (its choices, kernel
        formats and predicted time)."""
        col = np.asarray(columns, dtype=np.int64)
        chosen = tuple(self.choices_of(col).values())
        pred = self.predicted_time(col)
        return Solution(
            layers=self.layers, levels=col, sparsities=np.array([c.sparsity for c in chosen]), predicted_time_s=pred,
            predicted_speedup=self.dense_total_s / pred if pred > 0 else math.inf, total_error=total_error,
            solve_ms=solve_ms, choices=chosen,
            formats=None if self.formats is None else tuple(self.formats[i][int(c)] for i, c in enumerate(col)),
        )


@dataclass(frozen=True)
class Solution:
    """A DP answer: the column chosen per layer and what it costs.

    ``levels`` holds the table's column index per layer (the grid level, for a table over
    the grid alone); ``choices`` the chosen :class:`~spdy.choices.Choice` per layer (by
    default read from ``levels`` and ``sparsities`` as grid levels); ``formats`` the
    backend's kernel format per layer, when the table records formats.
    """

    layers: tuple[str, ...]
    levels: np.ndarray  # [L] int
    sparsities: np.ndarray  # [L] float
    predicted_time_s: float  # base + layer times (the additive latency model)
    predicted_speedup: float
    total_error: float
    solve_ms: float = float("nan")
    choices: tuple[Choice, ...] = ()  # () = grid levels, from levels and sparsities
    formats: tuple[str, ...] | None = None

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
        chosen = tuple(self.choices) or tuple(Choice.dense() if i == 0 else Choice(UNSTRUCTURED, s, int(i))
                                              for i, s in zip(lv, sp))
        if len(chosen) != len(self.layers):
            raise InvalidInputError(f"a solution needs one choice per layer: {len(self.layers)} layers, {len(chosen)} choices")
        object.__setattr__(self, "choices", chosen)
        if self.formats is not None:
            if len(self.formats) != len(self.layers):
                raise InvalidInputError(f"a solution needs one format per layer; got {len(self.formats)}")
            object.__setattr__(self, "formats", tuple(str(f) for f in self.formats))

    def as_dict(self) -> dict[str, float]:
        """Layer name -> sparsity."""
        return {n: float(s) for n, s in zip(self.layers, self.sparsities)}

    def as_choices(self) -> dict[str, Choice]:
        """Layer name -> :class:`~spdy.choices.Choice` (what ``Database.stitch`` takes)."""
        return dict(zip(self.layers, self.choices))

    def pattern_counts(self) -> dict[str, int]:
        """``{pattern: layers}``: how many layers run dense, unstructured and each N:M pattern."""
        out: dict[str, int] = {}
        for c in self.choices:
            out[c.pattern] = out.get(c.pattern, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        """``{"layers": {name: {"pattern", "sparsity", "level"[, "format"]}}, "levels": {name: sparsity},
        "level_index": {name: column}, "patterns", "predicted_time_s", ...}``."""
        layers = {}
        for i, (n, c) in enumerate(zip(self.layers, self.choices)):
            layers[n] = {**c.to_json(), **({"format": self.formats[i]} if self.formats is not None else {})}
        return {
            "layers": layers,
            "levels": self.as_dict(),
            "level_index": {n: int(i) for n, i in zip(self.layers, self.levels)},
            "patterns": self.pattern_counts(),
            "predicted_time_s": self.predicted_time_s,
            "predicted_speedup": self.predicted_speedup,
            "total_error": self.total_error,
            "solve_ms": self.solve_ms,
        }

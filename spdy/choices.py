"""Per-layer choices beyond the sparsity grid: dense, unstructured levels and N:M patterns.

On a GPU the useful ways to run a pruned layer are not only "unstructured at
level i": a 2:4 semi-structured weight runs on sparse tensor cores, while
unstructured 50-90 % runs no faster than dense. So a layer's choices become
``(pattern, level)`` pairs:

* ``Choice("dense", 0.0, 0)`` — the unpruned layer (grid level 0);
* ``Choice("unstructured", s_i, i)`` — grid level ``i >= 1`` (SPDY's levels);
* ``Choice("2:4", 0.5, 0)``, ``Choice("4:8", 0.5, 0)`` — an N:M pattern (``N`` kept of
  every ``M`` consecutive input weights per row); ``level`` is 0, the pattern's only
  level in the database (at sparsity ``1 - N/M``).

A :class:`ChoiceTable` is the DP's input over these columns: times ``[L, C]`` taken
from a :class:`~spdy.profile.Profile` (grid levels from its table, N:M patterns from
its per-pattern times), ``+inf`` where a layer does not have a choice (no kernel for
it on the backend, input size not a multiple of ``M``, not in the database). The DP
never picks an unavailable choice (see :func:`spdy.dp.solve_budget`,
``allow_unavailable``).

Error prior of an N:M choice (:func:`prior_errors`). SPDY scores level ``i`` of layer
``l`` with ``c_l * (i / (|S| - 1))^2``. An N:M choice at sparsity ``s`` gets the same
formula at ``s``'s *fractional* position on the grid (linear interpolation between
the two grid levels around ``s``; 2:4 and 4:8 at 0.5 sit at 2.79 on SPDY's 42-level
grid). So, under the prior, an N:M choice counts as damaging as unstructured pruning
to the same sparsity; the search's per-layer coefficients and the calibration loss of
the stitched model (which uses the real N:M weights) correct for the difference. A
caller that wants the prior to know that N:M is more damaging than unstructured at
the same sparsity passes ``positions`` from :func:`error_equivalent_positions`: the
grid position at which the layer's unstructured reconstruction error equals its N:M
error (from the database).

Use::

    profile = profile_model(bundle, backend, grid, patterns=("2:4",))   # per-pattern times
    db = build_database(bundle, "db/", grid, patterns=("2:4",))          # N:M weights
    table = choice_table(profile, database=db)
    sol = solve(table, prior_errors(table, c), speedup)    # or Search(table, objective, config)
    db.stitch(model, sol)                                  # N:M weights included
    backend.time_models(bundle, [spdy.profilers.backend_plan(sol, db, bundle.model)])
    sol.to_json()["layers"]       # {layer: {"pattern", "sparsity", "level", "format"}}
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spdy import dp
from spdy.errors import InfeasibleBudgetError, InvalidInputError
from spdy.grid import SparsityGrid

log = logging.getLogger(__name__)

DENSE = "dense"
UNSTRUCTURED = "unstructured"


# --------------------------------------------------------------------------- N:M patterns


@dataclass(frozen=True)
class NMPattern:
    """``n`` kept weights in every group of ``m`` consecutive input weights of a row."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m <= 64):
            raise InvalidInputError(
                f"an N:M pattern keeps n of every m weights with 0 < n < m <= 64; got n={self.n!r}, m={self.m!r}"
            )

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return self.name

    def fits(self, in_features: int) -> bool:
        """Whether a layer with this many (flattened) inputs can hold the pattern."""
        return in_features > 0 and in_features % self.m == 0

    def why_not(self, in_features: int) -> str | None:
        """None if :meth:`fits`, else the reason in words."""
        if self.fits(in_features):
            return None
        return f"input size {in_features} is not a multiple of {self.m}"


def parse_pattern(text: str | NMPattern) -> NMPattern:
    """``"2:4"`` -> ``NMPattern(2, 4)``."""
    if isinstance(text, NMPattern):
        return text
    parts = str(text).strip().split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        n, m = int(parts[0]), int(parts[1])
    except ValueError:
        raise InvalidInputError(
            f"an N:M pattern is written like '2:4' (keep 2 of every 4 consecutive input weights); got {text!r}"
        ) from None
    return NMPattern(n, m)


def parse_patterns(value: str | Iterable[str | NMPattern] | None) -> tuple[str, ...]:
    """``"2:4,4:8"`` or ``["2:4", "4:8"]`` -> ``("2:4", "4:8")`` (canonical names, duplicates dropped)."""
    if value is None:
        return ()
    items = [p for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
    out: list[str] = []
    for p in items:
        name = parse_pattern(p).name
        if name not in out:
            out.append(name)
    return tuple(out)


def is_nm(pattern: str) -> bool:
    return pattern not in (DENSE, UNSTRUCTURED)


# --------------------------------------------------------------------------- one choice


@dataclass(frozen=True)
class Choice:
    """How one layer is pruned: ``pattern`` (``"dense"``, ``"unstructured"`` or ``"N:M"``),
    its ``sparsity`` and its ``level`` (grid index for dense/unstructured, 0 for N:M)."""

    pattern: str
    sparsity: float
    level: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", float(self.sparsity))
        if isinstance(self.level, bool) or not isinstance(self.level, (int, np.integer)):
            raise InvalidInputError(f"a choice's level is an integer; got {self.level!r}")
        object.__setattr__(self, "level", int(self.level))
        if self.pattern == DENSE:
            if self.level != 0 or self.sparsity != 0.0:
                raise InvalidInputError(f"the dense choice has level 0 and sparsity 0; got {self.level}, {self.sparsity}")
        elif self.pattern == UNSTRUCTURED:
            if self.level < 1 or not 0.0 < self.sparsity < 1.0:
                raise InvalidInputError(
                    f"an unstructured choice has a grid level >= 1 and a sparsity in (0, 1); got level {self.level}, "
                    f"sparsity {self.sparsity} (level 0 is Choice('dense', 0.0, 0))"
                )
        else:
            nm = parse_pattern(self.pattern)
            if nm.name != self.pattern:
                raise InvalidInputError(f"write the pattern as {nm.name!r}, not {self.pattern!r}")
            if self.level != 0 or abs(self.sparsity - nm.sparsity) > 1e-12:
                raise InvalidInputError(
                    f"an {nm.name} choice has level 0 and sparsity {nm.sparsity:g}; got level {self.level}, "
                    f"sparsity {self.sparsity}"
                )

    @classmethod
    def dense(cls) -> "Choice":
        return cls(DENSE, 0.0, 0)

    @classmethod
    def unstructured(cls, grid: SparsityGrid, level: int) -> "Choice":
        """Grid level ``level`` (level 0 gives the dense choice)."""
        if not 0 <= int(level) < len(grid):
            raise InvalidInputError(f"level {level} is not on the grid (levels 0..{len(grid) - 1})")
        return cls.dense() if int(level) == 0 else cls(UNSTRUCTURED, grid[int(level)], int(level))

    @classmethod
    def nm(cls, pattern: str | NMPattern) -> "Choice":
        p = parse_pattern(pattern)
        return cls(p.name, p.sparsity, 0)

    @property
    def is_nm(self) -> bool:
        return is_nm(self.pattern)

    @property
    def is_dense(self) -> bool:
        return self.pattern == DENSE

    @property
    def nm_pattern(self) -> NMPattern | None:
        return parse_pattern(self.pattern) if self.is_nm else None

    @property
    def label(self) -> str:
        """``"dense"``, ``"2:4"`` or ``"unstructured 73.4%"``."""
        if self.pattern == UNSTRUCTURED:
            return f"unstructured {self.sparsity * 100:.1f}%"
        return self.pattern

    def to_json(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "sparsity": self.sparsity, "level": self.level}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Choice":
        try:
            return cls(str(d["pattern"]), float(d["sparsity"]), int(d["level"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidInputError):
                raise
            raise InvalidInputError(f"a choice is {{'pattern', 'sparsity', 'level'}}; got {d!r}") from None


# --------------------------------------------------------------------------- the DP's table


@dataclass(frozen=True)
class ChoiceTable:
    """Seconds per layer and choice: the DP's input when layers have more than grid levels.

    ``choices`` are the columns, the same for every layer; column 0 is the dense choice.
    ``times[l, c]`` is ``+inf`` where layer ``l`` does not have choice ``c``. ``formats``
    (optional) names the kernel format the backend runs each available entry in.
    """

    layers: tuple[str, ...]
    choices: tuple[Choice, ...]
    times: np.ndarray  # [L, C] seconds, +inf = unavailable
    base_s: float
    grid: SparsityGrid
    fingerprint: dict[str, Any] = field(default_factory=dict)
    formats: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "choices", tuple(self.choices))
        L, C = len(self.layers), len(self.choices)
        if L == 0 or C == 0:
            raise InvalidInputError(f"a choice table needs layers and choices; got {L} layers, {C} choices")
        if len(set(self.layers)) != L:
            raise InvalidInputError("layer names in a choice table must be unique")
        if len(set(self.choices)) != C:
            raise InvalidInputError("the choices (columns) of a choice table must be unique")
        if not self.choices[0].is_dense:
            raise InvalidInputError(f"column 0 of a choice table must be the dense choice; got {self.choices[0]}")
        for c in self.choices:
            if c.pattern == UNSTRUCTURED and (c.level >= len(self.grid) or abs(self.grid[c.level] - c.sparsity) > 1e-9):
                raise InvalidInputError(f"choice {c} is not a level of the table's grid")
        t = np.array(self.times, dtype=np.float64)
        if t.shape != (L, C):
            raise InvalidInputError(f"times have shape {t.shape}; expected {(L, C)} (layers x choices)")
        if np.any(np.isnan(t)) or np.any(t < 0):
            bad = np.argwhere(np.isnan(t) | (t < 0))[0]
            raise InvalidInputError(
                f"times must be >= 0 (+inf for an unavailable choice); layer {self.layers[bad[0]]!r}, "
                f"choice {self.choices[bad[1]].label}: {t[tuple(bad)]}"
            )
        if not np.all(np.isfinite(t[:, 0])):
            bad = int(np.flatnonzero(~np.isfinite(t[:, 0]))[0])
            raise InvalidInputError(f"layer {self.layers[bad]!r} has no dense time; every layer must be able to stay dense")
        t.setflags(write=False)
        object.__setattr__(self, "times", t)
        base = float(self.base_s)
        if not math.isfinite(base) or base < 0:
            raise InvalidInputError(f"base time must be a finite number >= 0 seconds; got {self.base_s!r}")
        object.__setattr__(self, "base_s", base)
        if self.formats is not None:
            fm = tuple(tuple(str(f) for f in row) for row in self.formats)
            if len(fm) != L or any(len(row) != C for row in fm):
                raise InvalidInputError(f"formats must be {L} rows of {C} format names")
            object.__setattr__(self, "formats", fm)

    @property
    def available(self) -> np.ndarray:
        """``[L, C]`` bool: which choices each layer has."""
        return np.isfinite(self.times)

    @property
    def dense_total_s(self) -> float:
        return self.base_s + float(self.times[:, 0].sum())

    def budget_for(self, speedup: float) -> float:
        return self.dense_total_s / speedup - self.base_s

    def fastest_total_s(self) -> float:
        return self.base_s + float(np.where(self.available, self.times, np.inf).min(axis=1).sum())

    def max_speedup(self) -> float:
        fastest = self.fastest_total_s()
        return self.dense_total_s / fastest if fastest > 0 else math.inf

    def predicted_time(self, columns: Sequence[int] | np.ndarray) -> float:
        col = np.asarray(columns, dtype=np.int64)
        return self.base_s + float(self.times[np.arange(len(self.layers)), col].sum())

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
        bad = [self.layers[i] for i, c in enumerate(col) if not (0 <= c < len(self.choices)) or not self.available[i, c]]
        if bad:
            raise InvalidInputError(f"layers {bad[:5]} get a choice they do not have")
        return {n: self.choices[int(c)] for n, c in zip(self.layers, col)}

    def patterns(self) -> tuple[str, ...]:
        return tuple(c.pattern for c in self.choices if c.is_nm)


def grid_position(grid: SparsityGrid, sparsity: float) -> float:
    """Fractional grid index of ``sparsity``: linear interpolation between the levels around it
    (clamped to ``[0, |S| - 1]``). A grid level's own sparsity gives its index exactly."""
    arr = grid.as_array()
    if len(arr) == 1:
        return 0.0
    return float(np.interp(float(sparsity), arr, np.arange(len(arr), dtype=np.float64)))


def choice_table(
    profile: Any,
    patterns: Iterable[str] | None = None,
    *,
    unstructured: bool = True,
    database: Any = None,
) -> ChoiceTable:
    """The DP's table over dense, the grid's unstructured levels and N:M patterns, from a profile.

    * ``profile``: a :class:`~spdy.profile.Profile`; its grid levels give the dense and
      unstructured columns, its per-pattern times (``profile.patterns``) the N:M columns.
    * ``patterns``: which of the profile's patterns to offer (default: all it timed); a
      pattern the profile did not time raises.
    * ``unstructured=False`` drops the unstructured levels (a dense-or-N:M search).
    * ``database``: a :class:`~spdy.database.Database`; an N:M choice is offered only to
      layers for which it holds that pattern (and patterns it lacks entirely are dropped,
      with a warning), so every choice the DP can make can be stitched.

    Unstructured levels stay columns even where the backend runs them in the dense
    format (same time as dense, more error): the DP's Pareto filter drops them.
    """
    table = profile.table
    have = tuple(getattr(profile, "patterns", ()) or ())
    want = have if patterns is None else parse_patterns(patterns)
    missing = [p for p in want if p not in have]
    if missing:
        raise InvalidInputError(
            f"the profile has no times for pattern(s) {missing} (it has {list(have) or 'none'}); "
            "re-run 'spdy profile' with --patterns " + ",".join(want)
        )
    if database is not None:
        db_patterns = tuple(getattr(database, "patterns", ()))
        dropped = [p for p in want if p not in db_patterns]
        if dropped:
            log.warning("the database has no %s reconstructions; those choices are left out (build it with "
                        "--patterns %s)", ", ".join(dropped), ",".join(want))
        want = tuple(p for p in want if p in db_patterns)
        if tuple(database.layers) != tuple(table.layers):
            raise InvalidInputError("the database and the profile list other layers; use a matching pair")
    L, S = len(table.layers), len(table.grid)
    pf = getattr(profile, "formats", None)  # [L][S] kernel format per grid level, or None
    ppf = getattr(profile, "pattern_formats", None)  # [L][P] kernel format per pattern, or None
    cols: list[Choice] = [Choice.dense()]
    times = [table.times[:, :1]]
    fmts: list[list[str]] | None = [[row[0]] for row in pf] if pf is not None else None
    if unstructured and S > 1:
        cols += [Choice.unstructured(table.grid, i) for i in range(1, S)]
        times.append(table.times[:, 1:])
        if fmts is not None:
            for i in range(L):
                fmts[i] += list(pf[i][1:])
    if want:
        P = np.empty((L, len(want)))
        for j, p in enumerate(want):
            k = have.index(p)
            P[:, j] = profile.pattern_times[:, k]
            if database is not None:
                P[[not database.has_pattern(i, p) for i in range(L)], j] = np.inf
            if fmts is not None:
                for i in range(L):
                    fmts[i].append(ppf[i][k] if ppf is not None else "?")
        cols += [Choice.nm(p) for p in want]
        times.append(P)
    T = np.concatenate(times, axis=1)
    formats = None
    if fmts is not None:
        formats = tuple(tuple(f if np.isfinite(T[i, c]) else "" for c, f in enumerate(row)) for i, row in enumerate(fmts))
    return ChoiceTable(table.layers, tuple(cols), T, table.base_s, table.grid, dict(table.fingerprint), formats)


def choice_positions(table: ChoiceTable) -> np.ndarray:
    """``[C]`` grid positions of the columns: the level for dense/unstructured, the fractional
    position of the pattern's sparsity for N:M (see the module doc)."""
    return np.array([float(c.level) if not c.is_nm else grid_position(table.grid, c.sparsity) for c in table.choices])


def error_equivalent_positions(table: ChoiceTable, database: Any) -> np.ndarray:
    """``[L, C]`` positions where each N:M column sits at the grid position whose unstructured
    reconstruction error (interpolated over the database's levels) equals the layer's N:M error.

    E.g. a layer whose 2:4 error matches its unstructured error at 62 % gets 2:4 at 62 %'s
    position. Other columns keep :func:`choice_positions`. Layers without the pattern keep the
    sparsity position (the DP never picks them anyway).
    """
    base = np.broadcast_to(choice_positions(table), table.times.shape).copy()
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


def prior_errors(
    table: ChoiceTable, coefficients: np.ndarray | None = None, positions: np.ndarray | None = None
) -> np.ndarray:
    """SPDY's prior over the table's columns: ``c_l * (pos / (|S| - 1))^2``, ``[L, C]``.

    ``positions`` is ``[C]`` or ``[L, C]`` (default :func:`choice_positions`). For a table
    of the grid's levels only, this equals :func:`spdy.dp.prior_errors`.
    """
    L, C = table.times.shape
    c = np.ones(L) if coefficients is None else np.asarray(coefficients, dtype=np.float64)
    if c.shape != (L,):
        raise InvalidInputError(f"expected {L} sensitivity coefficients; got shape {c.shape}")
    pos = choice_positions(table) if positions is None else np.asarray(positions, dtype=np.float64)
    if pos.shape not in ((C,), (L, C)) or not np.all(np.isfinite(pos)):
        raise InvalidInputError(f"positions must be finite, of shape ({C},) or ({L}, {C}); got {pos.shape}")
    ramp = (pos / max(len(table.grid) - 1, 1)) ** 2
    return c[:, None] * np.broadcast_to(ramp, (L, C))


# --------------------------------------------------------------------------- solving


@dataclass(frozen=True)
class ChoiceSolution:
    """A DP answer over a :class:`ChoiceTable`: one choice per layer and what it costs.

    ``levels`` holds the column index per layer (index into the table's ``choices``), as
    :class:`spdy.types.Solution` holds grid levels; ``choices`` the chosen :class:`Choice`
    per layer; ``formats`` the backend's kernel format per layer (when the table has them).
    """

    layers: tuple[str, ...]
    levels: np.ndarray  # [L] column indices
    choices: tuple[Choice, ...]
    predicted_time_s: float
    predicted_speedup: float
    total_error: float
    solve_ms: float = float("nan")
    formats: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        lv = np.asarray(self.levels, dtype=np.int64)
        if lv.shape != (len(self.layers),) or len(self.choices) != len(self.layers):
            raise InvalidInputError(
                f"a solution needs one choice per layer: {len(self.layers)} layers, {lv.shape} columns, "
                f"{len(self.choices)} choices"
            )
        lv.setflags(write=False)
        object.__setattr__(self, "levels", lv)
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.formats is not None:
            object.__setattr__(self, "formats", tuple(self.formats))

    @property
    def sparsities(self) -> np.ndarray:
        return np.array([c.sparsity for c in self.choices])

    def as_dict(self) -> dict[str, Choice]:
        """Layer name -> :class:`Choice` (what ``Database.stitch`` takes)."""
        return dict(zip(self.layers, self.choices))

    def pattern_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.choices:
            out[c.pattern] = out.get(c.pattern, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        """``{"layers": {name: {"pattern", "sparsity", "level"[, "format"]}}, ...}`` for result.json."""
        layers = {}
        for i, (n, c) in enumerate(zip(self.layers, self.choices)):
            rec = c.to_json()
            if self.formats is not None:
                rec["format"] = self.formats[i]
            layers[n] = rec
        return {
            "layers": layers,
            "levels": {n: c.sparsity for n, c in zip(self.layers, self.choices)},
            "patterns": self.pattern_counts(),
            "predicted_time_s": self.predicted_time_s,
            "predicted_speedup": self.predicted_speedup,
            "total_error": self.total_error,
            "solve_ms": self.solve_ms,
        }


def solve(table: ChoiceTable, errors: np.ndarray, speedup: float, buckets: int = dp.DEFAULT_BUCKETS) -> ChoiceSolution:
    """The least-error choice per layer for ``speedup`` over dense (base time counted), by SPDY's DP.

    ``errors`` is ``[L, C]`` (e.g. :func:`prior_errors`); entries of unavailable choices
    are ignored (they may be NaN or inf). Raises :class:`InfeasibleBudgetError` with the
    largest reachable speedup when even the fastest available choices are too slow.
    """
    speedup = dp.parse_speedup(speedup)
    e = np.array(errors, dtype=np.float64)
    if e.shape != table.times.shape:
        raise InvalidInputError(f"error scores have shape {e.shape}; expected {table.times.shape} (layers x choices)")
    avail = table.available
    bad = avail & ~np.isfinite(e)
    if bad.any():
        i, c = np.argwhere(bad)[0]
        raise InvalidInputError(
            f"error score of layer {table.layers[i]!r}, choice {table.choices[c].label} is {e[i, c]}; "
            "available choices need finite scores"
        )
    e[~avail] = 0.0  # never chosen (infinite time); any finite value keeps the kernel's input valid
    budget = table.budget_for(speedup)
    max_speedup = table.max_speedup()
    fastest = table.fastest_total_s() - table.base_s
    if budget <= 0 or fastest > budget * (1 + 1e-12):
        raise InfeasibleBudgetError(
            f"a {speedup:g}x speedup is out of reach: with every layer at its fastest available choice the model "
            f"takes {table.fastest_total_s():.6g} s of {table.dense_total_s:.6g} s dense (base time "
            f"{table.base_s:.6g} s is not prunable), so the largest reachable speedup is {max_speedup:.3f}x. "
            "Ask for less, offer more choices (patterns, unstructured levels), or exclude fewer layers.",
            max_speedup=max_speedup,
        )
    t0 = time.perf_counter()
    cols, total = dp.solve_budget(table.times, e, budget, buckets, allow_unavailable=True)
    ms = (time.perf_counter() - t0) * 1e3
    pred = table.predicted_time(cols)
    return ChoiceSolution(
        layers=table.layers,
        levels=cols,
        choices=tuple(table.choices[int(c)] for c in cols),
        predicted_time_s=pred,
        predicted_speedup=table.dense_total_s / pred if pred > 0 else math.inf,
        total_error=total,
        solve_ms=ms,
        formats=None if table.formats is None else tuple(table.formats[i][int(c)] for i, c in enumerate(cols)),
    )

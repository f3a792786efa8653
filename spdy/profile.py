"""Latency profiles on disk: the project's JSON format and SPDY's reference text format.

A profile is a :class:`~spdy.types.LatencyTable` plus what it was measured on
(backend, fingerprint, settings) and for which model (the layer specs). Loading
one made for another model or on other hardware is refused unless forced.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spdy.choices import Choice, parse_patterns
from spdy.errors import InvalidInputError, ProfileMismatchError
from spdy.grid import SparsityGrid
from spdy.hardware import fingerprint_differences
from spdy.io import atomic_write_json, read_json
from spdy.types import FusedPair, LatencyTable, LayerSpec, PlannedLayer

log = logging.getLogger(__name__)

SCHEMA = "spdy.profile"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Profile:
    """A latency table with its provenance.

    ``specs`` (one per layer, same order as ``table.layers``) is the model signature;
    it is empty for tables read from SPDY's reference text files. ``spread`` holds the
    relative spread of each timing ([L, S], optional), ``formats`` the kernel format the
    runtime uses per layer and level (optional), ``validation`` the predicted vs measured
    end-to-end times of random profiles.

    The table carries ``formats`` as its own (``table.formats``), so every solution of it
    names the format each layer runs in.

    N:M choices (optional, see :mod:`spdy.choices`): ``patterns`` names the patterns the
    backend was asked to time (``"2:4"``, ...); ``pattern_times`` ([L, P] seconds) holds
    each layer's time with that pattern's weight in its fastest format, ``+inf`` where the
    backend has no kernel for it on that layer; ``pattern_formats`` ([L][P]) the format
    (``""`` where unavailable) and ``pattern_spread`` ([L, P]) the spread. In the JSON a
    layer lists only its available patterns (``"patterns": {"2:4": {"time_s", "spread",
    "format"}}``); files without them load with no patterns.
    """

    table: LatencyTable
    backend: str = "unknown"
    model: str = "unknown"
    specs: tuple[LayerSpec, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    spread: np.ndarray | None = None
    formats: tuple[tuple[str, ...], ...] | None = None
    validation: tuple[dict[str, float], ...] = ()
    patterns: tuple[str, ...] = ()
    pattern_times: np.ndarray | None = None
    pattern_formats: tuple[tuple[str, ...], ...] | None = None
    pattern_spread: np.ndarray | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", tuple(self.specs))
        if self.formats is not None:
            object.__setattr__(self, "table", dataclasses.replace(self.table, formats=self.formats))
            object.__setattr__(self, "formats", self.table.formats)
        self._check_patterns()
        if self.specs and tuple(s.name for s in self.specs) != self.table.layers:
            raise InvalidInputError("profile specs must name the same layers, in the same order, as the table")
        if self.spread is not None:
            sp = np.asarray(self.spread, dtype=np.float64)
            if sp.shape != self.table.times.shape:
                raise InvalidInputError(f"spread has shape {sp.shape}; expected {self.table.times.shape}")
            object.__setattr__(self, "spread", sp)
        object.__setattr__(self, "validation", tuple(dict(v) for v in self.validation))

    def _check_patterns(self) -> None:
        pats = parse_patterns(self.patterns)
        if pats != tuple(self.patterns):
            raise InvalidInputError(f"profile patterns must be canonical and unique ('2:4', ...); got {list(self.patterns)}")
        object.__setattr__(self, "patterns", pats)
        L, P = len(self.table.layers), len(pats)
        if not P:
            if self.pattern_times is not None and np.asarray(self.pattern_times).size:
                raise InvalidInputError("pattern_times given without patterns")
            object.__setattr__(self, "pattern_times", None)
            object.__setattr__(self, "pattern_formats", None)
            object.__setattr__(self, "pattern_spread", None)
            return
        pt = np.full((L, P), np.inf) if self.pattern_times is None else np.array(self.pattern_times, dtype=np.float64)
        if pt.shape != (L, P):
            raise InvalidInputError(f"pattern_times has shape {pt.shape}; expected {(L, P)} (layers x patterns)")
        if np.any(np.isnan(pt)) or np.any(pt < 0):
            raise InvalidInputError("pattern_times must be >= 0 seconds, or +inf where a layer has no kernel for the pattern")
        pt.setflags(write=False)
        object.__setattr__(self, "pattern_times", pt)
        if self.pattern_formats is not None:
            pf = tuple(tuple(str(f) for f in row) for row in self.pattern_formats)
            if len(pf) != L or any(len(row) != P for row in pf):
                raise InvalidInputError(f"pattern_formats must be {L} rows of {P} format names")
            object.__setattr__(self, "pattern_formats", pf)
        if self.pattern_spread is not None:
            ps = np.array(self.pattern_spread, dtype=np.float64)
            if ps.shape != (L, P):
                raise InvalidInputError(f"pattern_spread has shape {ps.shape}; expected {(L, P)}")
            object.__setattr__(self, "pattern_spread", ps)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.table.fingerprint

    def with_validation(self, records: list[dict[str, float]]) -> "Profile":
        return dataclasses.replace(self, validation=tuple(records))

    def check_model(self, specs: list[LayerSpec] | tuple[LayerSpec, ...]) -> None:
        """Raise :class:`ProfileMismatchError` unless the profile was made for these layers."""
        if not self.specs:
            return
        mine = [(s.name, s.weight_shape, s.input_shape) for s in self.specs]
        theirs = [(s.name, s.weight_shape, s.input_shape) for s in specs]
        if mine != theirs:
            extra = sorted({m[0] for m in mine} ^ {t[0] for t in theirs})[:5]
            raise ProfileMismatchError(
                f"the profile was measured for another model signature ({len(mine)} layers, model {self.model!r}) "
                f"than the current model ({len(theirs)} layers)"
                + (f"; differing layers include {extra}" if extra else "; layer shapes differ")
                + ". Re-run 'spdy profile' for this model, or pass --force to use it anyway."
            )

    def check_hardware(self, current: dict[str, Any]) -> None:
        """Raise :class:`ProfileMismatchError` if ``current`` differs from the profile's fingerprint."""
        diffs = fingerprint_differences(self.fingerprint, current)
        if diffs:
            raise ProfileMismatchError(
                "the profile was measured on other hardware or runtimes: "
                + "; ".join(diffs[:4])
                + (f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else "")
                + ". Re-run 'spdy profile' here, or pass --force to use it anyway."
            )

    def to_json(self) -> dict[str, Any]:
        t = self.table
        layers = []
        for i, name in enumerate(t.layers):
            rec: dict[str, Any] = self.specs[i].to_json() if self.specs else {"name": name}
            rec["times_s"] = [float(x) for x in t.times[i]]
            if self.spread is not None:
                rec["spread"] = [float(x) for x in self.spread[i]]
            if self.formats is not None:
                rec["formats"] = list(self.formats[i])
            if self.patterns:
                pats = {}
                for k, p in enumerate(self.patterns):
                    t_p = float(self.pattern_times[i, k])  # type: ignore[index]
                    if not np.isfinite(t_p):
                        continue  # no kernel for this pattern on this layer
                    entry: dict[str, Any] = {"time_s": t_p}
                    if self.pattern_spread is not None:
                        entry["spread"] = float(self.pattern_spread[i, k])
                    if self.pattern_formats is not None:
                        entry["format"] = self.pattern_formats[i][k]
                    pats[p] = entry
                rec["patterns"] = pats
            layers.append(rec)
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "backend": self.backend,
            "grid": t.grid.to_json(),
            "base_s": t.base_s,
            "dense_total_s": t.dense_total_s,
            "fingerprint": t.fingerprint,
            "settings": self.settings,
            "layers": layers,
            "validation": list(self.validation),
            **({"patterns": list(self.patterns)} if self.patterns else {}),
            **({"fused_pairs": [p.to_json(t.layers) for p in t.fused]} if t.fused else {}),
            **({"planned_layers": [g.to_json(t.layers) for g in t.planned]} if t.planned else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "profile") -> "Profile":
        if d.get("schema") != SCHEMA:
            raise InvalidInputError(f"{source} is not an spdy profile (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise InvalidInputError(
                f"{source} has profile schema version {d.get('schema_version')!r}; this spdy reads version "
                f"{SCHEMA_VERSION}. Re-run 'spdy profile' to regenerate it."
            )
        try:
            grid = SparsityGrid.from_json(d["grid"])
            layers = d["layers"]
            names = [rec["name"] for rec in layers]
            times = np.array([rec["times_s"] for rec in layers], dtype=np.float64)
            table = LatencyTable(names, grid, times, float(d["base_s"]), dict(d.get("fingerprint", {})))
            has_specs = all("kind" in rec for rec in layers)
            specs = tuple(LayerSpec.from_json(rec) for rec in layers) if has_specs else ()
            spread = np.array([rec["spread"] for rec in layers]) if all("spread" in r for r in layers) else None
            formats = tuple(tuple(r["formats"]) for r in layers) if all("formats" in r for r in layers) else None
            patterns = tuple(d.get("patterns", ()))
            fused = tuple(FusedPair.from_json(p, names) for p in d.get("fused_pairs", ()))
            planned = tuple(PlannedLayer.from_json(g, names) for g in d.get("planned_layers", ()))
            p_times = p_spread = p_formats = None
            if patterns:
                p_times = np.full((len(layers), len(patterns)), np.inf)
                p_spread = np.full((len(layers), len(patterns)), np.nan)
                fm = [["" for _ in patterns] for _ in layers]
                for i, rec in enumerate(layers):
                    for p, entry in (rec.get("patterns") or {}).items():
                        if p not in patterns:
                            raise ValueError(f"layer {rec['name']!r} times pattern {p!r}, not among {list(patterns)}")
                        k = patterns.index(p)
                        p_times[i, k] = float(entry["time_s"])
                        p_spread[i, k] = float(entry.get("spread", np.nan))
                        fm[i][k] = str(entry.get("format", "?"))
                p_formats = tuple(tuple(r) for r in fm)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidInputError):
                raise
            raise InvalidInputError(f"{source} is a malformed spdy profile: {exc!r}") from None
        if fused or planned:
            if formats is None:
                raise InvalidInputError(f"{source} is a malformed spdy profile: fused or planned layers without the "
                                        "layers' formats")
            table = dataclasses.replace(table, formats=formats, fused=fused, planned=planned)
        return cls(
            table=table,
            backend=str(d.get("backend", "unknown")),
            model=str(d.get("model", "unknown")),
            specs=specs,
            settings=dict(d.get("settings", {})),
            spread=spread,
            formats=formats,
            validation=tuple(d.get("validation", ())),
            patterns=patterns,
            pattern_times=p_times,
            pattern_formats=p_formats,
            pattern_spread=p_spread,
        )


def choice_table(profile: Profile, patterns: Iterable[str] | str | None = None, *, unstructured: bool = True,
                 database: Any = None) -> LatencyTable:
    """The DP's table over dense, the grid's unstructured levels and N:M patterns, from a profile.

    * ``patterns``: which of the profile's per-pattern times (``profile.patterns``) to offer
      as columns after the grid's levels (default: all it timed); a pattern the profile did
      not time raises. A layer without a kernel for a pattern gets ``+inf`` there.
    * ``unstructured=False`` drops the unstructured levels (a dense-or-N:M table).
    * ``database``: a :class:`~spdy.database.Database`; an N:M choice is offered only to
      layers for which it holds that pattern (patterns it lacks entirely are dropped, with a
      warning), so every choice the DP can make can be stitched.

    Without patterns, the result is the profile's own table. Unstructured levels stay
    columns even where the backend runs them in the dense format (same time as dense,
    more error): the DP's Pareto filter drops them.
    """
    table = profile.table
    want = _offered_patterns(profile, patterns, database)
    cols = list(table.choices if unstructured else table.choices[:1])
    times = [table.times[:, :len(cols)]]
    fmts = [list(row[:len(cols)]) for row in table.formats] if table.formats is not None else None
    L = len(table.layers)
    for p in want:
        k = profile.patterns.index(p)
        t = np.array(profile.pattern_times[:, k])  # type: ignore[index]
        if database is not None:
            t[[not database.has_pattern(i, p) for i in range(L)]] = np.inf
        times.append(t[:, None])
        cols.append(Choice.nm(p))
        if fmts is not None:
            pf = profile.pattern_formats
            for i in range(L):
                fmts[i].append("" if not np.isfinite(t[i]) else pf[i][k] if pf is not None else "?")
    if not want and unstructured:
        return table
    return LatencyTable(table.layers, table.grid, np.concatenate(times, axis=1), table.base_s, dict(table.fingerprint),
                        tuple(cols), None if fmts is None else tuple(tuple(row) for row in fmts),
                        table.fused if fmts is not None else (), table.planned if fmts is not None else ())


def _offered_patterns(profile: Profile, patterns: Iterable[str] | str | None, database: Any) -> tuple[str, ...]:
    """:func:`choice_table`'s patterns: those asked for (all the profile timed by default) that the database holds."""
    have = profile.patterns
    want = have if patterns is None else parse_patterns(patterns)
    missing = [p for p in want if p not in have]
    if missing:
        raise InvalidInputError(
            f"the profile has no times for pattern(s) {missing} (it has {list(have) or 'none'}); "
            "re-run 'spdy profile' with --patterns " + ",".join(want)
        )
    if database is None:
        return want
    if tuple(database.layers) != tuple(profile.table.layers):
        raise InvalidInputError("the database and the profile list other layers; use a matching pair")
    dropped = [p for p in want if p not in tuple(database.patterns)]
    if dropped:
        log.warning("the database has no %s reconstructions; those choices are left out (build it with "
                    "--patterns %s)", ", ".join(dropped), ",".join(want))
    return tuple(p for p in want if p not in dropped)


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> None:
    atomic_write_json(path, profile.to_json())


def read_reference_timings(path: str | os.PathLike[str]) -> Profile:
    """Parse SPDY's reference latency text format.

    The file holds ``base`` and the dense end-to-end time, ``prunable`` and the sum of
    the dense layer times, then per layer its name followed by ``<time> <sparsity>``
    lines, so the base time is the difference of the two totals. Quirks of the published
    files are handled: a repeated level keeps its first time, and trailing name-only lines
    (no timings) are ignored. A file whose listed layers do not add up to its ``prunable``
    total (cut off, or layers missing) is refused: read as it is, it would be a smaller model.
    """
    path = Path(path)
    total, prunable, entries = _reference_entries(path)
    grid_levels = sorted({s for _, s in entries[0][1]})
    _check_reference_total(path, prunable, entries, len(grid_levels))
    names = [name for name, _ in entries]
    times = np.array([_reference_row(path, name, vals, grid_levels) for name, vals in entries])
    if np.any(times < 0):
        raise InvalidInputError(f"{path}: negative layer times")
    base = total - prunable
    if base < 0:
        raise InvalidInputError(f"{path}: dense total {total} is smaller than the prunable sum {prunable}")
    table = LatencyTable(names, SparsityGrid(tuple(grid_levels)), times, base, {"source": f"reference:{path.name}"})
    return Profile(table=table, backend="reference", model=path.stem)


def _reference_entries(path: Path) -> tuple[float, float, list[tuple[str, list[tuple[float, float]]]]]:
    """``(total, prunable, [(layer, [(time, sparsity)])])`` of a reference file; layers without timings dropped."""
    try:
        raw = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise InvalidInputError(f"timings file {str(path)!r} does not exist") from None
    lines = [ln.strip() for ln in raw if ln.strip()]
    if len(lines) < 4 or lines[0] != "base" or lines[2] != "prunable":
        raise InvalidInputError(
            f"{path} is not in SPDY's reference timings format (expected 'base', a number, 'prunable', a number, "
            "then a layer name followed by '<time> <sparsity>' lines) nor an spdy profile JSON"
        )
    try:
        total, prunable = float(lines[1]), float(lines[3])
    except ValueError:
        raise InvalidInputError(f"{path}: 'base' and 'prunable' must be followed by numbers") from None
    entries: list[tuple[str, list[tuple[float, float]]]] = []
    for lineno, ln in enumerate(lines[4:], start=5):
        parts = ln.split()
        if len(parts) == 1:
            entries.append((parts[0], []))
        elif len(parts) == 2 and entries:
            try:
                entries[-1][1].append((float(parts[0]), float(parts[1])))
            except ValueError:
                raise InvalidInputError(f"{path}:{lineno}: expected '<time> <sparsity>', got {ln!r}") from None
        else:
            raise InvalidInputError(f"{path}:{lineno}: expected a layer name or '<time> <sparsity>', got {ln!r}")
    dropped = [n for n, v in entries if not v]
    if dropped:
        log.info("%s: %d name-only lines without timings ignored", path.name, len(dropped))
    entries = [(n, v) for n, v in entries if v]
    if not entries:
        raise InvalidInputError(f"{path} holds no layer timings")
    return total, prunable, entries


def _reference_row(path: Path, name: str, vals: list[tuple[float, float]], grid_levels: list[float]) -> list[float]:
    """One layer's times on the first layer's grid; a missing level takes the time of the nearest lower one."""
    seen: dict[float, float] = {}
    for t, s in vals:
        if s in seen:
            log.warning("%s: layer %s lists sparsity %.4f twice; keeping the first time", path.name, name, s)
            continue
        seen[s] = t
    levels = sorted(seen)
    extra = set(levels) - set(grid_levels)
    if extra:
        raise InvalidInputError(f"{path}: layer {name} has levels {sorted(extra)[:3]} that the first layer's grid lacks")
    row = []
    for s in grid_levels:
        if s not in seen:
            lower = [x for x in levels if x < s]
            if not lower:
                raise InvalidInputError(f"{path}: layer {name} lacks the dense level {s}")
            log.warning("%s: layer %s has no time for sparsity %.4f; using that of %.4f", path.name, name, s, lower[-1])
            seen[s] = seen[lower[-1]]
        row.append(seen[s])
    return row


def _check_reference_total(path: Path, prunable: float, entries: list[tuple[str, list[tuple[float, float]]]],
                           n_levels: int) -> None:
    """Refuse a file whose layers' dense times (each one's first time at sparsity 0) do not add up
    to its ``prunable`` total."""
    listed = sum(next((t for t, s in vals if s == 0.0), 0.0) for _, vals in entries)
    if abs(listed - prunable) <= 1e-3 * prunable:
        return
    last, vals = entries[-1]
    n_last = len({s for _, s in vals})
    where = f"; its last layer, {last}, has {n_last} of {n_levels} levels" if n_last < n_levels else ""
    raise InvalidInputError(
        f"{path}: the dense times of the {len(entries)} layers listed add up to {listed:.6g} s, but 'prunable' says "
        f"{prunable:.6g} s: the file is cut off or lacks layers{where}. Copy the complete file again (or, for a "
        "model that leaves layers out, write their sum after 'prunable')"
    )


def load_profile(
    path: str | os.PathLike[str],
    *,
    specs: list[LayerSpec] | None = None,
    fingerprint: dict[str, Any] | None = None,
    force: bool = False,
) -> Profile:
    """Read a profile JSON or a reference text file.

    With ``specs`` and/or ``fingerprint`` given, a profile made for another model or on
    other hardware raises :class:`ProfileMismatchError`, unless ``force`` (then it warns).
    """
    p = Path(path)
    if p.suffix.lower() == ".json" or (p.exists() and p.read_bytes()[:1] == b"{"):
        prof = Profile.from_json(read_json(p, "profile"), source=str(p))
    else:
        prof = read_reference_timings(p)
    for check, arg in ((prof.check_model, specs), (prof.check_hardware, fingerprint)):
        if arg is None:
            continue
        try:
            check(arg)  # type: ignore[arg-type]
        except ProfileMismatchError as exc:
            if not force:
                raise
            log.warning("using the profile anyway (--force): %s", exc)
    return prof

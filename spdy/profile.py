"""Latency profiles on disk: the project's JSON format and SPDY's reference text format.

A profile is a :class:`~spdy.types.LatencyTable` plus what it was measured on
(backend, fingerprint, settings) and for which model (the layer specs). Loading
one made for another model or on other hardware is refused unless forced.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spdy.errors import InvalidInputError, ProfileMismatchError
from spdy.grid import SparsityGrid
from spdy.hardware import fingerprint_differences
from spdy.io import atomic_write_json, read_json
from spdy.types import LatencyTable, LayerSpec

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
    """

    table: LatencyTable
    backend: str = "unknown"
    model: str = "unknown"
    specs: tuple[LayerSpec, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    spread: np.ndarray | None = None
    formats: tuple[tuple[str, ...], ...] | None = None
    validation: tuple[dict[str, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", tuple(self.specs))
        if self.specs and tuple(s.name for s in self.specs) != self.table.layers:
            raise InvalidInputError("profile specs must name the same layers, in the same order, as the table")
        if self.spread is not None:
            sp = np.asarray(self.spread, dtype=np.float64)
            if sp.shape != self.table.times.shape:
                raise InvalidInputError(f"spread has shape {sp.shape}; expected {self.table.times.shape}")
            object.__setattr__(self, "spread", sp)
        object.__setattr__(self, "validation", tuple(dict(v) for v in self.validation))

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
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidInputError):
                raise
            raise InvalidInputError(f"{source} is a malformed spdy profile: {exc!r}") from None
        return cls(
            table=table,
            backend=str(d.get("backend", "unknown")),
            model=str(d.get("model", "unknown")),
            specs=specs,
            settings=dict(d.get("settings", {})),
            spread=spread,
            formats=formats,
            validation=tuple(d.get("validation", ())),
        )


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> None:
    atomic_write_json(path, profile.to_json())


def read_reference_timings(path: str | os.PathLike[str]) -> Profile:
    """Parse SPDY's reference latency text format (see ``shared/reference/README.md``).

    ``base`` is the dense end-to-end time and ``prunable`` the sum of the dense layer
    times, so the base time is their difference. Quirks of the published files are
    handled: a repeated level keeps its first time, and trailing name-only lines
    (no timings) are ignored.
    """
    path = Path(path)
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
    grid_levels: list[float] | None = None
    names, rows = [], []
    for name, vals in entries:
        seen: dict[float, float] = {}
        for t, s in vals:
            if s in seen:
                log.warning("%s: layer %s lists sparsity %.4f twice; keeping the first time", path.name, name, s)
                continue
            seen[s] = t
        levels = sorted(seen)
        if grid_levels is None:
            grid_levels = levels
        extra = set(levels) - set(grid_levels)
        if extra:
            raise InvalidInputError(
                f"{path}: layer {name} has levels {sorted(extra)[:3]} that the first layer's grid lacks"
            )
        row = []
        for s in grid_levels:
            if s not in seen:
                # a missing level is estimated by the time of the nearest lower level listed
                lower = [x for x in levels if x < s]
                if not lower:
                    raise InvalidInputError(f"{path}: layer {name} lacks the dense level {s}")
                log.warning("%s: layer %s has no time for sparsity %.4f; using that of %.4f", path.name, name, s, lower[-1])
                seen[s] = seen[lower[-1]]
            row.append(seen[s])
        names.append(name)
        rows.append(row)
    assert grid_levels is not None
    times = np.array(rows)
    if np.any(times < 0):
        raise InvalidInputError(f"{path}: negative layer times")
    base = total - prunable
    if base < 0:
        raise InvalidInputError(f"{path}: dense total {total} is smaller than the prunable sum {prunable}")
    listed = float(times[:, 0].sum())
    if abs(listed - prunable) > 1e-3 * prunable:
        # layers counted in 'prunable' but not listed: their dense time belongs to the base
        log.warning("%s: 'prunable' (%.6g s) differs from the listed dense layers (%.6g s); the difference "
                    "counts as base time", path.name, prunable, listed)
        base = total - listed
    table = LatencyTable(names, SparsityGrid(tuple(grid_levels)), times, base, {"source": f"reference:{path.name}"})
    return Profile(table=table, backend="reference", model=path.stem)


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

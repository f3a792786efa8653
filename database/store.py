"""The on-disk reconstruction database: build (resumable), open, verify, stitch.

Layout of a database directory (one per model + calibration set + grid + method)::

    DIR/manifest.json                       schema version, model, grid, calibration hash,
                                            method, layer specs, per-layer errors and sha256
    DIR/000-<layer name>.safetensors        every level of layer 0
    DIR/001-<layer name>.safetensors        ...

A layer file holds, for level ``i`` (two-digit prefix ``"07."``), the tensors of
its encoding (see :mod:`spdy.database.encoding`): ``dense`` for level 0 (the
model's own weight, so stitching level 0 restores a layer exactly), then
``bitmap`` + ``values`` or ``indptr`` + ``indices`` + ``values``, whichever is
cheaper. N:M patterns built with ``patterns=("2:4", ...)`` are stored in the same file
under the prefix ``"nm2_4."`` (same encodings); the manifest lists them (``"patterns"``)
and records per layer and pattern ``{"encoding", "nnz", "error"}``, or
``{"skipped": reason}`` for a layer that cannot hold it (input size not a multiple of
M). A manifest without ``"patterns"`` (older builds) opens with none. Its safetensors
metadata repeats the layer name, shape, encodings and errors, so a file is
self-describing. Every file and the manifest are written to
a temp file and moved into place with ``os.replace``; the manifest is rewritten
after each layer, so a killed build keeps every finished layer and a rebuild
restarts at the first missing (or damaged) one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors
from torch import nn

from spdy import __version__
from spdy.choices import Choice, parse_pattern, parse_patterns
from spdy.database import encoding as enc
from spdy.database.hessian import capture_hessians
from spdy.database.reconstruction import DEFAULT_DAMP, METHODS, reconstruct, zeros_per_level
from spdy.errors import DatabaseError, InvalidInputError, ProfileMismatchError
from spdy.grid import DEFAULT_GRID, SparsityGrid
from spdy.io import atomic_write_bytes, atomic_write_json
from spdy.models.base import ModelBundle, get_module
from spdy.types import LayerSpec

log = logging.getLogger(__name__)

FORMAT = "spdy-database"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_CACHE_BYTES = 512 << 20
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- helpers


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def weight_sha256(weight: torch.Tensor) -> str:
    """sha256 of a dense weight as contiguous float32 bytes (identifies the model's layer)."""
    t = weight.detach().to(torch.float32).contiguous().cpu()
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def layer_filename(index: int, name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "layer"
    return f"{index:03d}-{safe[:120]}.safetensors"


def _json_safe(meta: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[str(k)] = v
    return out


def _level_prefix(level: int) -> str:
    return f"{level:02d}."


def _pattern_prefix(pattern: str) -> str:
    p = parse_pattern(pattern)
    return f"nm{p.n}_{p.m}."


def _prefix(key: int | str) -> str:
    """Tensor-name prefix of a grid level (int) or an N:M pattern (str)."""
    return _pattern_prefix(key) if isinstance(key, str) else _level_prefix(key)


def _matrix(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


# --------------------------------------------------------------------------- build


def build_database(
    bundle: ModelBundle,
    out_dir: str | os.PathLike[str],
    grid: SparsityGrid = DEFAULT_GRID,
    method: str = "obs",
    damp: float | None = None,
    progress: bool = True,
    *,
    overwrite: bool = False,
    blocksize: int = 128,
    max_hessian_bytes: int = 2 << 30,
    patterns: Sequence[str] | str = (),
) -> "Database":
    """Reconstruct every prunable layer of ``bundle`` at every level of ``grid`` into ``out_dir``.

    * ``method``: ``"obs"`` (SparseGPT-style, default), ``"exact"`` (OBS masks, exact
      per-row least-squares refit) or ``"magnitude"`` (no refit);
      see :mod:`spdy.database.reconstruction`.
    * ``damp``: diagonal damping as a fraction of ``mean(diag H)``; ``None`` means 0.01
      for ``obs`` and 0 (plain least squares) for ``exact``.
    * Resumable: layers already in ``out_dir`` with a matching checksum are kept, the
      others are (re)built. A directory holding a database for another model,
      calibration set, grid or method raises :class:`ProfileMismatchError` unless
      ``overwrite=True``, which deletes that database's files first.
    * ``max_hessian_bytes`` bounds the float64 Hessians held at once; more layers
      than fit take more passes over the calibration set.
    * ``patterns``: N:M patterns (``("2:4", "4:8")`` or ``"2:4,4:8"``) to reconstruct
      besides the grid, with the same method and the layer's same Hessian factor. Asking
      an existing database for patterns it lacks rebuilds its layers with them; a build
      without ``patterns`` keeps the ones it has. Layers whose input size is not a
      multiple of M are recorded as skipped for that pattern.

    Returns the opened :class:`Database`. Logs progress; ``progress`` shows tqdm bars.
    """
    _check_build_arguments(bundle, grid, method, damp, blocksize)
    asked_patterns = parse_patterns(patterns)
    damp_used = DEFAULT_DAMP[method] if damp is None else float(damp)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"output path {str(out)!r} exists and is not a directory; choose a folder for the database")
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    specs = bundle.layers()
    modules = {s.name: get_module(bundle.model, s.name) for s in specs}
    hashes = [weight_sha256(modules[s.name].weight) for s in specs]
    header = _header(bundle, grid, method, damp_used, blocksize)
    fresh_layers = [{"spec": s.to_json(), "weight_sha256": h, "file": None} for s, h in zip(specs, hashes)]
    manifest = _open_manifest(out, header, fresh_layers, overwrite)
    manifest.update(spdy_version=__version__, complete=False)
    # patterns only accumulate: the stored ones plus the asked ones
    stored_patterns = tuple(manifest.get("patterns", ()))
    all_patterns = stored_patterns + tuple(p for p in asked_patterns if p not in stored_patterns)
    if all_patterns:
        manifest["patterns"] = list(all_patterns)
    todo = _layers_to_build(out, manifest, all_patterns)
    atomic_write_json(out / MANIFEST, manifest)
    if not todo:
        log.info("database %s is complete (%d layers); nothing to build", out, len(specs))
    else:
        log.info(
            "building %d of %d layers x %d levels%s with %s (damp %g) into %s",
            len(todo), len(specs), len(grid), f" + {', '.join(all_patterns)}" if all_patterns else "",
            method, damp_used, out,
        )
    build = _LayerBuild(out, manifest, bundle, specs, modules, hashes, method, grid.as_array(), damp_used,
                        blocksize, all_patterns)
    build.run(_hessian_groups(specs, todo, max_hessian_bytes), progress)
    manifest["complete"] = all(e.get("file") for e in manifest["layers"])
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(out / MANIFEST, manifest)
    if todo:
        log.info("built %d layers in %.1f s", len(todo), time.perf_counter() - t_start)
    return Database.open(out)


def _header(bundle: ModelBundle, grid: SparsityGrid, method: str, damp: float, blocksize: int) -> dict[str, Any]:
    """What a database is made from: a database built from another setup is another database."""
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "spdy_version": __version__,
        "model": bundle.name,
        "model_meta": _json_safe(bundle.meta),
        "calibration_id": bundle.calibration_id,
        "n_calibration_batches": len(bundle.calibration),
        "n_calibration_samples": bundle.n_samples,
        "grid": grid.to_json(),
        "method": method,
        "damp": damp,
        "blocksize": blocksize,
    }


def _check_build_arguments(bundle: Any, grid: Any, method: str, damp: float | None, blocksize: int) -> None:
    if not isinstance(bundle, ModelBundle):
        raise InvalidInputError(f"bundle must be a spdy ModelBundle; got {type(bundle).__name__} (see spdy.models.load_model)")
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if damp is not None and not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise InvalidInputError(f"damp must be a finite number >= 0 or None; got {damp!r}")
    if not isinstance(grid, SparsityGrid):
        raise InvalidInputError(f"grid must be a SparsityGrid; got {type(grid).__name__}")
    if blocksize < 1:
        raise InvalidInputError(f"blocksize must be >= 1; got {blocksize}")


def _open_manifest(out: Path, header: dict[str, Any], fresh_layers: list[dict[str, Any]],
                   overwrite: bool) -> dict[str, Any]:
    """The manifest to build on: the one in ``out`` when it was made for this setup (``header``),
    else a fresh one. Another setup's database is refused, or deleted with ``overwrite``."""
    manifest: dict[str, Any] | None = None
    if (out / MANIFEST).exists():
        try:
            old = _read_manifest(out)
        except DatabaseError as exc:
            if not overwrite:
                raise DatabaseError(f"{exc}. Pass overwrite=True (--overwrite) to start over in {out}") from None
            old = None
        if old is not None:
            diffs = _header_differences(old, header, fresh_layers)
            if diffs and not overwrite:
                raise ProfileMismatchError(
                    f"{out} holds a database for another setup ({'; '.join(diffs[:4])}). "
                    "Choose another output folder, or pass overwrite=True (--overwrite) to replace it."
                )
            if diffs:
                log.warning("replacing the database in %s (%s)", out, "; ".join(diffs[:4]))
                _remove_database_files(out, old)
            else:
                manifest = old
    if manifest is None:
        manifest = {**header, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False, "layers": fresh_layers}
    return manifest


def _layers_to_build(out: Path, manifest: dict[str, Any], patterns: Sequence[str]) -> list[int]:
    """Indices of the layers without a sound file holding every pattern; their entries are reset."""
    todo = []
    for i, entry in enumerate(manifest["layers"]):
        lacking = [p for p in patterns if p not in (entry.get("patterns") or {})]
        if entry.get("file") and _layer_file_ok(out, entry) and not lacking:
            continue
        if entry.get("file") and lacking:
            log.info("layer %s: rebuilding it to add pattern(s) %s", entry["spec"]["name"], ", ".join(lacking))
        elif entry.get("file"):
            log.warning("layer %s: file %s is missing or damaged; rebuilding it", entry["spec"]["name"], entry["file"])
        entry.update(file=None)
        todo.append(i)
    return todo


def _hessian_groups(specs: Sequence[LayerSpec], todo: Sequence[int], max_bytes: int) -> list[list[int]]:
    """The layers to build in groups whose float64 Hessians fit in ``max_bytes`` together."""
    groups: list[list[int]] = []
    used = 0
    for i in todo:
        d = specs[i].matrix_shape[1]
        need = 8 * d * d
        if groups and used + need <= max_bytes:
            groups[-1].append(i)
            used += need
        else:
            groups.append([i])
            used = need
    return groups


@dataclass(frozen=True)
class _LayerBuild:
    """What building one layer needs; :meth:`run` builds groups of layers, one Hessian capture per group."""

    out: Path
    manifest: dict[str, Any]
    bundle: ModelBundle
    specs: Sequence[LayerSpec]
    modules: dict[str, Any]
    hashes: Sequence[str]
    method: str
    sparsities: np.ndarray
    damp: float
    blocksize: int
    patterns: tuple[str, ...]

    def run(self, groups: list[list[int]], progress: bool) -> None:
        bar = None
        if progress and groups:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(len(g) for g in groups), desc=f"database ({self.method})", unit="layer",
                       disable=None)  # None: off when not a tty
        try:
            for group in groups:
                t0 = time.perf_counter()
                stats = capture_hessians(self.bundle, [self.specs[i] for i in group], progress=progress)
                log.info("captured %d Hessians in %.1f s", len(group), time.perf_counter() - t0)
                for i in group:
                    self.layer(i, stats.pop(self.specs[i].name))
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def layer(self, i: int, st: Any) -> None:
        """Reconstruct layer ``i`` from its Hessian statistics, write it and record it in the manifest."""
        spec = self.specs[i]
        t1 = time.perf_counter()
        W = _matrix(self.modules[spec.name]).to(torch.float32)
        if self.patterns:
            rec = reconstruct(self.method, W, st.H, self.sparsities, damp=self.damp, blocksize=self.blocksize,
                              patterns=self.patterns)
        else:
            rec = reconstruct(self.method, W, st.H, self.sparsities, damp=self.damp, blocksize=self.blocksize)
        entry = _write_layer(self.out, i, spec, rec, self.hashes[i])
        entry.update(n_rows=st.n_rows, seconds=round(time.perf_counter() - t1, 3))
        self.manifest["layers"][i] = entry
        atomic_write_json(self.out / MANIFEST, self.manifest)
        log.debug("layer %s: %.2f s, %d bytes", spec.name, entry["seconds"], entry["bytes"])


def _write_layer(out: Path, index: int, spec: LayerSpec, rec: Any, weight_hash: str) -> dict[str, Any]:
    rows, cols = spec.matrix_shape
    tensors: dict[str, np.ndarray] = {}
    encodings, nnz = [], []
    weights = rec.weights.numpy()
    keep = (~rec.pruned).numpy()
    for s in range(weights.shape[0]):
        e, t = enc.encode(weights[s], keep[s], _level_prefix(s))
        tensors.update(t)
        encodings.append(e)
        nnz.append(int(keep[s].sum()))
    errors = [float(x) for x in rec.errors]
    patterns: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(getattr(rec, "patterns", ())):
        if rec.pattern_weights[k] is None:
            patterns[name] = {"skipped": str(rec.pattern_skipped[k])}
            continue
        keep_p = (~rec.pattern_pruned[k]).numpy()
        e, t = enc.encode(rec.pattern_weights[k].numpy(), keep_p, _pattern_prefix(name))
        tensors.update(t)
        patterns[name] = {"encoding": e, "nnz": int(keep_p.sum()), "error": float(rec.pattern_errors[k])}
    meta = {
        "format": FORMAT + "-layer",
        "schema_version": str(SCHEMA_VERSION),
        "layer": spec.name,
        "matrix_shape": json.dumps([rows, cols]),
        "encodings": json.dumps(encodings),
        "nnz": json.dumps(nnz),
        "errors": json.dumps(errors),
    }
    if patterns:
        meta["patterns"] = json.dumps(patterns)
    data = save_safetensors(tensors, metadata=meta)
    name = layer_filename(index, spec.name)
    atomic_write_bytes(out / name, data)
    return {
        "spec": spec.to_json(),
        "weight_sha256": weight_hash,
        "file": name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "encodings": encodings,
        "nnz": nnz,
        "errors": errors,
        **({"patterns": patterns} if patterns else {}),
    }


def _layer_file_ok(out: Path, entry: Mapping[str, Any]) -> bool:
    path = out / str(entry["file"])
    try:
        return path.stat().st_size == entry.get("bytes") and _sha256_file(path) == entry.get("sha256")
    except OSError:
        return False


def _remove_database_files(out: Path, manifest: Mapping[str, Any]) -> None:
    for entry in manifest.get("layers", []):
        name = entry.get("file")
        if name and "/" not in name and "\\" not in name:
            try:
                (out / name).unlink()
            except FileNotFoundError:
                pass
    try:
        (out / MANIFEST).unlink()
    except FileNotFoundError:
        pass


def _header_differences(old: Mapping[str, Any], new: Mapping[str, Any], new_layers: Sequence[Mapping[str, Any]]) -> list[str]:
    diffs = []
    for key, what in (
        ("model", "model"),
        ("calibration_id", "calibration set"),
        ("grid", "grid"),
        ("method", "method"),
        ("damp", "damp"),
        ("blocksize", "blocksize"),
    ):
        if old.get(key) != new.get(key):
            a, b = old.get(key), new.get(key)
            if key == "calibration_id":
                a, b = str(a)[:12], str(b)[:12]
            elif key == "grid":
                a, b = f"{len(a or [])} levels", f"{len(b or [])} levels"
            diffs.append(f"{what}: stored {a!r}, now {b!r}")
    old_layers = [(e["spec"], e.get("weight_sha256")) for e in old.get("layers", [])]
    now_layers = [(e["spec"], e.get("weight_sha256")) for e in new_layers]
    if [s for s, _ in old_layers] != [s for s, _ in now_layers]:
        diffs.append(f"layers: stored {len(old_layers)} layer specs, the model has {len(now_layers)} that differ")
    elif [h for _, h in old_layers] != [h for _, h in now_layers]:
        changed = [s["name"] for (s, h), (_, h2) in zip(old_layers, now_layers) if h != h2]
        diffs.append(f"weights: {len(changed)} layers have other dense weights (first: {changed[0]})")
    return diffs


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise DatabaseError(f"database folder {str(path)!r} does not exist; build it with 'spdy database build'")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DatabaseError(
            f"{str(path)!r} has no {MANIFEST}: not a spdy database (build one with 'spdy database build')"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatabaseError(f"{mpath} is not valid JSON ({exc}); the database is damaged: rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatabaseError(f"{mpath} is not a spdy database manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatabaseError(
            f"{mpath} has schema version {version!r}; this spdy ({__version__}) reads version {SCHEMA_VERSION}. "
            "Rebuild the database with this version."
        )
    for key in ("model", "calibration_id", "grid", "method", "layers"):
        if key not in manifest:
            raise DatabaseError(f"{mpath} lacks the field {key!r}; the database is damaged: rebuild it")
    return manifest


# --------------------------------------------------------------------------- the database


class Database:
    """A reconstruction database opened for reading.

    ``layers`` (names, in model order), ``specs``, ``grid``, ``errors`` ([layers, levels]
    relative reconstruction errors), ``weight(layer, level)``, ``stitch(model, {layer: level})``,
    ``verify()`` and ``check_compatible(bundle)``. N:M patterns (when built with them):
    ``patterns``, ``pattern_errors`` ([layers, patterns], NaN where a layer has none),
    ``has_pattern(layer, pattern)``, ``weight(layer, 0, pattern="2:4")`` or
    ``weight(layer, Choice.nm("2:4"))``, and ``stitch`` takes :class:`spdy.choices.Choice`
    values. Layer files are memory-mapped
    (safetensors ``safe_open``) and decoded weights are kept in an LRU cache of at most
    ``cache_bytes`` bytes, so stitching the same levels again is a plain copy.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path = Path(path)
        self.manifest = manifest
        try:
            self.grid = SparsityGrid.from_json(manifest["grid"])
            self.specs: tuple[LayerSpec, ...] = tuple(LayerSpec.from_json(e["spec"]) for e in manifest["layers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DatabaseError(f"{self.path / MANIFEST} is damaged ({exc}); rebuild the database") from None
        self.layers: tuple[str, ...] = tuple(s.name for s in self.specs)
        self._index = {n: i for i, n in enumerate(self.layers)}
        S = len(self.grid)
        errors = np.full((len(self.specs), S), np.nan)
        for i, e in enumerate(manifest["layers"]):
            if e.get("file"):
                row = np.asarray(e.get("errors", []), dtype=np.float64)
                if row.shape != (S,):
                    raise DatabaseError(f"layer {self.layers[i]!r}: {len(row)} errors in the manifest for {S} levels; rebuild it")
                errors[i] = row
        errors.setflags(write=False)
        self.errors: np.ndarray = errors
        try:
            self.patterns: tuple[str, ...] = parse_patterns(manifest.get("patterns") or ())
        except InvalidInputError as exc:
            raise DatabaseError(f"{self.path / MANIFEST} lists bad patterns ({exc}); rebuild the database") from None
        p_errors = np.full((len(self.specs), len(self.patterns)), np.nan)
        for i, e in enumerate(manifest["layers"]):
            if e.get("file"):
                for k, pat in enumerate(self.patterns):
                    rec = (e.get("patterns") or {}).get(pat) or {}
                    if "error" in rec:
                        p_errors[i, k] = float(rec["error"])
        p_errors.setflags(write=False)
        self.pattern_errors: np.ndarray = p_errors
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple[int, int | str], torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self._handles: dict[int, Any] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    # ---- opening

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, require_complete: bool = True, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> "Database":
        """Open the database in ``path``; an incomplete one raises unless ``require_complete=False``."""
        p = Path(path)
        db = cls(p, _read_manifest(p), cache_bytes=cache_bytes)
        if require_complete and db.missing:
            raise DatabaseError(
                f"database {str(p)!r} is incomplete: {len(db.missing)} of {len(db.layers)} layers missing "
                f"(first: {db.missing[0]}). Run 'spdy database build' again with the same options to resume."
            )
        return db

    def close(self) -> None:
        self._handles.clear()
        self.clear_cache()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Database({str(self.path)!r}, model={self.model!r}, method={self.method!r}, "
            f"{len(self.layers)} layers x {len(self.grid)} levels{'' if self.complete else ', incomplete'})"
        )

    # ---- descriptive properties

    @property
    def model(self) -> str:
        return str(self.manifest["model"])

    @property
    def method(self) -> str:
        return str(self.manifest["method"])

    @property
    def calibration_id(self) -> str:
        return str(self.manifest["calibration_id"])

    @property
    def missing(self) -> list[str]:
        """Names of the layers not built yet."""
        return [self.layers[i] for i, e in enumerate(self.manifest["layers"]) if not e.get("file")]

    @property
    def complete(self) -> bool:
        return not self.missing

    def file_bytes(self) -> dict[str, int]:
        """Bytes on disk per built layer."""
        return {self.layers[i]: int(e["bytes"]) for i, e in enumerate(self.manifest["layers"]) if e.get("file")}

    def total_bytes(self) -> int:
        """Bytes of all layer files plus the manifest."""
        m = self.path / MANIFEST
        return sum(self.file_bytes().values()) + (m.stat().st_size if m.exists() else 0)

    def dense_bytes(self) -> int:
        """What storing every level of every layer as dense float32 would take."""
        return sum(4 * s.numel for s in self.specs) * len(self.grid)

    def encodings(self, layer: str | int) -> list[str]:
        return list(self.manifest["layers"][self._layer_index(layer)].get("encodings", []))

    # ---- weights

    def _layer_index(self, layer: str | int) -> int:
        if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
            i = int(layer)
            if not 0 <= i < len(self.layers):
                raise InvalidInputError(f"layer index {i} out of range; the database has {len(self.layers)} layers")
            return i
        try:
            return self._index[layer]
        except (KeyError, TypeError):
            raise InvalidInputError(
                f"the database has no layer {layer!r}; it has {len(self.layers)} layers, e.g. {self.layers[:3]}"
            ) from None

    def _level_index(self, level: int) -> int:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise InvalidInputError(
                f"a level is an integer index into the grid (0 = dense .. {len(self.grid) - 1}); got {level!r}. "
                "For a sparsity value use db.grid.index_of(sparsity)."
            )
        lv = int(level)
        if not 0 <= lv < len(self.grid):
            raise InvalidInputError(f"level {lv} out of range; the grid has levels 0..{len(self.grid) - 1}")
        return lv

    def _pattern_record(self, i: int, pattern: str) -> dict[str, Any]:
        try:
            pat = parse_pattern(pattern).name
        except InvalidInputError:
            raise InvalidInputError(f"{pattern!r} is not an N:M pattern like '2:4'") from None
        if pat not in self.patterns:
            raise InvalidInputError(
                f"the database has no {pat} reconstructions (it has {list(self.patterns) or 'no patterns'}); "
                f"build them with 'spdy database build ... --patterns {pat}'"
            )
        entry = self.manifest["layers"][i]
        if not entry.get("file"):
            raise DatabaseError(f"layer {self.layers[i]!r} is not built yet; run 'spdy database build' again to resume")
        rec = (entry.get("patterns") or {}).get(pat)
        if rec is None:
            raise DatabaseError(f"layer {self.layers[i]!r} has no {pat} entry; run 'spdy database build' again")
        if "skipped" in rec:
            raise InvalidInputError(f"layer {self.layers[i]!r} has no {pat} choice: {rec['skipped']}")
        return rec

    def has_pattern(self, layer: str | int, pattern: str) -> bool:
        """Whether ``layer`` has a stored ``pattern`` weight (False if skipped, not asked for or not built)."""
        i = self._layer_index(layer)
        try:
            pat = parse_pattern(pattern).name
        except InvalidInputError:
            return False
        rec = (self.manifest["layers"][i].get("patterns") or {}).get(pat)
        return bool(self.manifest["layers"][i].get("file")) and pat in self.patterns and rec is not None and "skipped" not in rec

    def pattern_skipped(self, pattern: str) -> dict[str, str]:
        """``{layer: reason}`` for the layers that cannot hold ``pattern``."""
        pat = parse_pattern(pattern).name
        out = {}
        for i, e in enumerate(self.manifest["layers"]):
            rec = (e.get("patterns") or {}).get(pat)
            if rec is not None and "skipped" in rec:
                out[self.layers[i]] = str(rec["skipped"])
        return out

    def _key(self, i: int, level: int | Choice, pattern: str | None) -> int | str:
        """The cache/storage key of a request: a grid level (int) or an N:M pattern name (str)."""
        if isinstance(level, Choice):
            if pattern is not None and pattern != level.pattern:
                raise InvalidInputError(f"pattern {pattern!r} contradicts the choice {level.label}")
            pattern, level = level.pattern, level.level
        if pattern is None or pattern in ("dense", "unstructured"):
            return self._level_index(level)  # type: ignore[arg-type]
        rec_pattern = parse_pattern(pattern).name
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or int(level) != 0:
            raise InvalidInputError(f"an N:M pattern has one level, 0; got level {level!r} for pattern {rec_pattern}")
        self._pattern_record(i, rec_pattern)
        return rec_pattern

    def _handle(self, i: int) -> Any:
        h = self._handles.get(i)
        if h is None:
            entry = self.manifest["layers"][i]
            if not entry.get("file"):
                raise DatabaseError(
                    f"layer {self.layers[i]!r} is not built yet; run 'spdy database build' again to resume"
                )
            path = self.path / entry["file"]
            try:
                h = safe_open(str(path), framework="numpy")
            except FileNotFoundError:
                raise DatabaseError(f"layer file {path} is missing; rebuild the database (the build resumes)") from None
            except Exception as exc:  # safetensors raises its own error types on a damaged header
                raise DatabaseError(f"layer file {path} cannot be read ({exc}); run 'spdy database verify'") from None
            self._handles[i] = h
        return h

    def _decode(self, i: int, level: int | str) -> torch.Tensor:
        spec = self.specs[i]
        rows, cols = spec.matrix_shape
        if isinstance(level, str):
            encoding = self._pattern_record(i, level)["encoding"]
        else:
            encoding = self.manifest["layers"][i]["encodings"][level]
        h = self._handle(i)

        def get(key: str) -> np.ndarray:
            try:
                return h.get_tensor(key)
            except Exception as exc:
                raise DatabaseError(f"{self.path / self.manifest['layers'][i]['file']}: tensor {key!r} unreadable ({exc})") from None

        out = torch.empty(spec.weight_shape, dtype=torch.float32)
        enc.decode(get, encoding, rows, cols, _prefix(level), out=out.numpy())
        return out

    def _tensor(self, i: int, level: int | str) -> torch.Tensor:
        key = (i, level)
        t = self._cache.get(key)
        if t is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return t
        self.cache_misses += 1
        t = self._decode(i, level)
        nbytes = t.numel() * 4
        if nbytes <= self.cache_bytes:
            self._cache[key] = t
            self._cached_bytes += nbytes
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.numel() * 4
        return t

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0

    def cache_info(self) -> dict[str, int]:
        return {
            "entries": len(self._cache),
            "bytes": self._cached_bytes,
            "max_bytes": self.cache_bytes,
            "hits": self.cache_hits,
            "misses": self.cache_misses,
        }

    def weight(self, layer: str | int, level: int | Choice, pattern: str | None = None) -> np.ndarray:
        """The reconstructed weight of ``layer`` at grid level ``level``: dense float32 with zeros,
        in the layer's own shape. Read-only (it is the cached array); copy it to modify it.

        ``pattern="2:4"`` (with ``level`` 0) gives the layer's N:M weight instead; ``level`` may
        also be a :class:`spdy.choices.Choice`."""
        i = self._layer_index(layer)
        arr = self._tensor(i, self._key(i, level, pattern)).numpy().view()
        arr.setflags(write=False)
        return arr

    def stitch(self, model: nn.Module, levels: Mapping[str, int | Choice] | Any, inplace: bool = True) -> nn.Module:
        """Load the weights of ``{layer name: level}`` into ``model`` and return it.

        A value may be a grid level (int) or a :class:`spdy.choices.Choice` (an N:M pattern
        among them). ``levels`` may also be a :class:`spdy.types.Solution` (its ``layers`` and
        ``choices``).
        Layers not named keep their current weights. With ``inplace=False`` a deep copy of
        ``model`` is stitched and returned, and ``model`` is left as it was.
        """
        if not isinstance(levels, Mapping):
            if hasattr(levels, "layers") and hasattr(levels, "choices"):
                levels = dict(zip(levels.layers, levels.choices))
            elif hasattr(levels, "layers") and hasattr(levels, "levels"):
                levels = dict(zip(levels.layers, (int(x) for x in levels.levels)))
            else:
                raise InvalidInputError(f"levels must map layer names to level indices; got {type(levels).__name__}")
        plan = []
        for name, lv in levels.items():
            i = self._layer_index(name)
            plan.append((name, i, self._key(i, lv, None)))
        if not inplace:
            model = copy.deepcopy(model)
        with torch.no_grad():
            for name, i, lv in plan:
                param = getattr(get_module(model, name), "weight", None)
                if not isinstance(param, torch.Tensor) or tuple(param.shape) != self.specs[i].weight_shape:
                    got = None if param is None else tuple(param.shape)
                    raise InvalidInputError(
                        f"layer {name!r} of the model has weight shape {got}; the database stores "
                        f"{self.specs[i].weight_shape}. Is this the model the database was built for?"
                    )
                param.copy_(self._tensor(i, lv))
        return model

    # ---- checks

    def check_compatible(self, bundle: ModelBundle, grid: SparsityGrid | None = None) -> None:
        """Raise :class:`ProfileMismatchError` unless this database was built for ``bundle``
        (same model name, calibration set, layer specs and dense weights) and, when given, ``grid``."""
        problems = []
        if bundle.name != self.model:
            problems.append(f"model: database {self.model!r}, given {bundle.name!r}")
        if bundle.calibration_id != self.calibration_id:
            problems.append(
                f"calibration set: database {self.calibration_id[:12]}, given {bundle.calibration_id[:12]}"
            )
        if grid is not None and tuple(grid.levels) != tuple(self.grid.levels):
            problems.append(f"grid: database has {len(self.grid)} levels, given {len(grid)} (or other values)")
        if not problems:
            for spec in bundle.layers():
                i = self._index.get(spec.name)
                if i is None:
                    problems.append(f"layer {spec.name!r} is not in the database")
                    break
                mine = self.specs[i]
                if (mine.kind, mine.weight_shape) != (spec.kind, spec.weight_shape):
                    problems.append(f"layer {spec.name!r}: database {mine.kind} {mine.weight_shape}, model {spec.kind} {spec.weight_shape}")
                    break
                if weight_sha256(get_module(bundle.model, spec.name).weight) != self.manifest["layers"][i].get("weight_sha256"):
                    problems.append(f"layer {spec.name!r} has other dense weights than the database was built from")
                    break
        if problems:
            raise ProfileMismatchError(
                f"database {str(self.path)!r} was built for another setup: {'; '.join(problems)}. "
                "Build a database for this model and calibration set (spdy database build)."
            )

    def verify(self) -> list[str]:
        """Every problem found (empty list = fine): missing or damaged files (sha256, sizes),
        undecodable levels, and levels whose kept count is not exactly their sparsity's."""
        problems: list[str] = []
        S = len(self.grid)
        for i, entry in enumerate(self.manifest["layers"]):
            name = self.layers[i]
            if not entry.get("file"):
                problems.append(f"layer {name}: not built (run 'spdy database build' again to resume)")
                continue
            path = self.path / entry["file"]
            if not path.exists():
                problems.append(f"layer {name}: file {entry['file']} is missing")
                continue
            size = path.stat().st_size
            if size != entry.get("bytes"):
                problems.append(f"layer {name}: file {entry['file']} has {size} bytes, the manifest says {entry.get('bytes')}")
                continue
            digest = _sha256_file(path)
            if digest != entry.get("sha256"):
                problems.append(f"layer {name}: file {entry['file']} is corrupted (sha256 {digest[:12]}, expected {str(entry.get('sha256'))[:12]})")
                continue
            encodings = entry.get("encodings", [])
            if len(encodings) != S:
                problems.append(f"layer {name}: {len(encodings)} levels in the manifest, the grid has {S}")
                continue
            numel = self.specs[i].numel
            expected_nnz = numel - zeros_per_level(self.grid.as_array(), numel)
            self._handles.pop(i, None)
            try:
                h = self._handle(i)
                meta = h.metadata() or {}
                if meta.get("layer") != name:
                    problems.append(f"layer {name}: file {entry['file']} holds layer {meta.get('layer')!r}")
                    continue
                for lv in range(S):
                    w = self._decode(i, lv)
                    if not torch.isfinite(w).all():
                        problems.append(f"layer {name} level {lv}: non-finite weights")
                    kept = self._stored_nnz(h, encodings[lv], lv, numel)
                    if lv > 0 and kept != int(expected_nnz[lv]):
                        problems.append(f"layer {name} level {lv}: {kept} kept weights, expected {int(expected_nnz[lv])}")
                problems += self._verify_patterns(i, entry, h)
            except DatabaseError as exc:
                problems.append(f"layer {name}: {exc}")
        return problems

    def _verify_patterns(self, i: int, entry: Mapping[str, Any], h: Any) -> list[str]:
        """Every stored N:M weight decodes, is finite and keeps exactly N of every M per row-group."""
        problems: list[str] = []
        name = self.layers[i]
        rows, cols = self.specs[i].matrix_shape
        recs = entry.get("patterns") or {}
        for pat in self.patterns:
            rec = recs.get(pat)
            if rec is None:
                problems.append(f"layer {name}: pattern {pat} not built (run 'spdy database build' again)")
                continue
            if "skipped" in rec:
                continue
            nm = parse_pattern(pat)
            w = self._decode(i, pat)
            if not torch.isfinite(w).all():
                problems.append(f"layer {name} pattern {pat}: non-finite weights")
            keep = self._stored_keep(h, rec["encoding"], _pattern_prefix(pat), rows, cols)
            if cols % nm.m:
                problems.append(f"layer {name} pattern {pat}: stored although {cols} inputs are not a multiple of {nm.m}")
                continue
            per_group = keep.reshape(rows, cols // nm.m, nm.m).sum(-1)
            if not np.all(per_group == nm.n):
                bad = int(np.sum(per_group != nm.n))
                problems.append(f"layer {name} pattern {pat}: {bad} row-groups do not keep exactly {nm.n} of {nm.m}")
        return problems

    @staticmethod
    def _stored_keep(h: Any, encoding: str, prefix: str, rows: int, cols: int) -> np.ndarray:
        """The stored keep mask (``rows x cols`` bool) of one encoded matrix."""
        L = rows * cols
        if encoding == "dense":
            return np.ones((rows, cols), dtype=bool)  # a dense encoding keeps everything
        if encoding == "bitmap":
            return np.unpackbits(h.get_tensor(prefix + "bitmap"), count=L).view(bool).reshape(rows, cols)
        indptr = h.get_tensor(prefix + "indptr").astype(np.int64)
        indices = h.get_tensor(prefix + "indices").astype(np.int64)
        keep = np.zeros(L, dtype=bool)
        keep[np.repeat(np.arange(rows, dtype=np.int64) * cols, np.diff(indptr)) + indices] = True
        return keep.reshape(rows, cols)

    @staticmethod
    def _stored_nnz(h: Any, encoding: str, level: int, numel: int) -> int:
        p = _level_prefix(level)
        if encoding == "dense":
            return numel
        if encoding == "bitmap":
            return int(np.unpackbits(h.get_tensor(p + "bitmap"), count=numel).sum())
        return int(len(h.get_tensor(p + "values")))

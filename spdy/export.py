"""The pruned model on disk: sparse weights of the pruned layers plus a manifest.

``OUT/model/weights.safetensors`` holds, per pruned layer, its weight in CSR
(``<layer>.crow``, ``<layer>.col``, ``<layer>.val``; Conv2d weights flattened to
out x in*kh*kw); ``OUT/model/manifest.json`` the shapes, levels and provenance.
Layers that stay dense are not stored: the original model supplies them.
Buffers re-estimated for the pruned model (BatchNorm running statistics) are
stored as ``buffer:<module>.<buffer>`` and listed under ``buffers`` in the manifest.
The manifest's ``batchnorm_folds`` lists the ``[layer, BatchNorm]`` pairs the model was
timed with folded (:mod:`spdy.fold`); ``spdy.apply`` folds them (:func:`load_folds`).
``weights_sha256`` is the SHA-256 of ``weights.safetensors``: loading checks it, so a file
changed or cut short since spdy wrote it is an error, not a silently different model; the
search's ``fingerprint`` (the machine and runtime it was timed on) lets loading on another
machine warn (:func:`hardware_differences`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spdy.errors import InvalidInputError, ProfileMismatchError
from spdy.io import atomic_write_bytes, atomic_write_json, read_json
from spdy.models.base import get_module

log = logging.getLogger(__name__)

SCHEMA = "spdy.pruned-model"
SCHEMA_VERSION = 1


def _to_csr(w: np.ndarray) -> dict[str, np.ndarray]:
    m = w.reshape(w.shape[0], -1)
    rows, cols = np.nonzero(m)
    crow = np.zeros(m.shape[0] + 1, dtype=np.int64)
    np.add.at(crow, rows + 1, 1)
    return {
        "crow": np.cumsum(crow).astype(np.int32),
        "col": cols.astype(np.int32),
        "val": m[rows, cols].astype(np.float32),
    }


def _from_csr(crow: np.ndarray, col: np.ndarray, val: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    rows = int(shape[0])
    m = np.zeros((rows, int(np.prod(shape[1:]))), dtype=np.float32)
    row_idx = np.repeat(np.arange(rows), np.diff(crow))
    m[row_idx, col] = val
    return m.reshape(shape)


def save_pruned(model: nn.Module, layers: Mapping[str, dict[str, Any]], out_dir: str | os.PathLike[str],
                meta: dict[str, Any] | None = None, buffers: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write the weights of ``layers`` (name -> {"sparsity", "level", ...}) from ``model`` to ``out_dir``,
    and ``buffers`` (``<module>.<buffer>`` -> array, e.g. re-estimated BatchNorm statistics).

    Unpruned layers keep the model's own weights and are not stored; the manifest's
    ``unpruned_formats`` records the kernel format each was timed in where that is not torch's
    own (``"dense"``), e.g. spdy's blocked kernel on the full weight, which the runtime fuses with
    its neighbours: ``spdy.apply(..., sparse=True)`` runs them so too."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    tensors: dict[str, np.ndarray] = {f"buffer:{k}": np.ascontiguousarray(v) for k, v in (buffers or {}).items()}
    entries = {}
    unpruned = {}
    for name, info in layers.items():
        w = get_module(model, name).weight.detach().cpu().numpy()
        if float(info.get("sparsity", 0.0)) == 0.0:
            if info.get("format", "dense") != "dense":
                unpruned[name] = str(info["format"])
            continue
        for k, v in _to_csr(w).items():
            tensors[f"{name}.{k}"] = v
        entries[name] = {**info, "shape": list(w.shape), "nnz": int(np.count_nonzero(w))}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/w.safetensors")
        data = Path(f"{tmp}/w.safetensors").read_bytes()
        atomic_write_bytes(out / "weights.safetensors", data)
    atomic_write_json(out / "manifest.json", {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
                                              "layers": entries, "unpruned_formats": unpruned,
                                              "buffers": sorted(buffers or {}),
                                              "weights_sha256": hashlib.sha256(data).hexdigest(), **(meta or {})})
    return out


def _checked_weights(d: Path, man: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``weights.safetensors`` of the pruned model in ``d``, after checking it against the manifest's
    checksum (manifests written before checksums have none and are not checked)."""
    from safetensors.numpy import load

    path = d / "weights.safetensors"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc}. Re-run the search to write it again.") from None
    want = man.get("weights_sha256")
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise InvalidInputError(
            f"{path} does not match the checksum in its manifest: it was changed or cut short after spdy wrote it. "
            "Restore the file or re-run the search.")
    return load(data)


#: the fingerprint keys that say which machine a result was timed on
MACHINE_KEYS = ("cpu_model", "machine", "logical_cores", "usable_cores")


def hardware_differences(manifest: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """How the machine a pruned model was timed on (its manifest's ``fingerprint``) differs from
    ``current`` (:func:`spdy.hardware.fingerprint`); empty when it does not, or is not recorded."""
    then = manifest.get("fingerprint")
    if not isinstance(then, Mapping):
        return []
    return [f"{k}: timed on {then.get(k)!r}, this machine has {current.get(k)!r}"
            for k in MACHINE_KEYS if k in then and then.get(k) != current.get(k)]


def load_pruned(model_dir: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Dense fp32 weights (zeros where pruned) per stored layer, and the manifest."""
    d = Path(model_dir)
    man = read_json(d / "manifest.json", "pruned-model manifest")
    if man.get("schema") != SCHEMA or man.get("schema_version") != SCHEMA_VERSION:
        raise InvalidInputError(f"{d} is not an spdy pruned model of schema version {SCHEMA_VERSION}")
    t = _checked_weights(d, man)
    weights = {}
    for name, e in man["layers"].items():
        weights[name] = _from_csr(t[f"{name}.crow"], t[f"{name}.col"], t[f"{name}.val"], tuple(e["shape"]))
    return weights, man


def load_buffers(model_dir: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The buffers stored with a pruned model (``<module>.<buffer>`` -> array); empty if none."""
    d = Path(model_dir)
    man = read_json(d / "manifest.json", "pruned-model manifest")
    names = man.get("buffers", [])
    if not names:
        return {}
    t = _checked_weights(d, man)
    return {n: t[f"buffer:{n}"] for n in names}


def load_folds(manifest: Mapping[str, Any]) -> tuple[Any, ...]:
    """The BatchNorm folds (:class:`spdy.fold.FoldPair`) a pruned model's manifest records; none
    for a model written before folding (it was timed unfolded)."""
    from spdy.fold import FoldPair

    folds = manifest.get("batchnorm_folds", [])
    if not isinstance(folds, list):
        raise InvalidInputError(f"the manifest's batchnorm_folds must be a list of [layer, BatchNorm]; got {folds!r}")
    return tuple(FoldPair.from_json(p) for p in folds)


@torch.no_grad()
def apply_buffers(model: nn.Module, buffers: Mapping[str, np.ndarray]) -> nn.Module:
    """Copy stored buffers (e.g. BatchNorm running statistics) into ``model`` in place."""
    for name, v in buffers.items():
        try:
            buf = model.get_buffer(name)
        except AttributeError:
            raise ProfileMismatchError(f"the pruned model stores buffer {name!r}, which this model lacks; "
                                       "the pruned weights were made for another model") from None
        if tuple(buf.shape) != tuple(v.shape):
            raise ProfileMismatchError(f"buffer {name!r}: stored shape {tuple(v.shape)}, the model's is {tuple(buf.shape)}")
        buf.copy_(torch.from_numpy(np.ascontiguousarray(v)).to(buf.dtype))
    return model


@torch.no_grad()
def apply_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> nn.Module:
    """Copy ``weights`` into the model's layers in place (shapes must match)."""
    for name, w in weights.items():
        mod = get_module(model, name)
        if tuple(mod.weight.shape) != tuple(w.shape):
            raise ProfileMismatchError(
                f"layer {name!r}: stored weight has shape {tuple(w.shape)}, the model's is {tuple(mod.weight.shape)}; "
                "the pruned weights were made for another model"
            )
        mod.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)).to(mod.weight.dtype))
    return model

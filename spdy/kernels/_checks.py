"""Input validation shared by the kernel wrappers (messages: given, expected, what to do)."""

from __future__ import annotations

from typing import Any

import numpy as np

from spdy.errors import InvalidInputError


def as_weight(weight: Any, ndim: int, what: str = "weight") -> np.ndarray:
    """A C-contiguous fp32 copy of a numpy array or torch tensor of rank ``ndim``."""
    if hasattr(weight, "detach"):  # torch tensor
        weight = weight.detach().cpu().numpy()
    if not isinstance(weight, np.ndarray):
        raise InvalidInputError(f"{what} must be a numpy array or torch tensor; got {type(weight).__name__}")
    if weight.ndim != ndim:
        raise InvalidInputError(f"{what} must have {ndim} dimensions; got shape {weight.shape}")
    if weight.dtype.kind not in "fiu":
        raise InvalidInputError(f"{what} must be numeric (it is converted to float32); got dtype {weight.dtype}")
    w = np.array(weight, dtype=np.float32, order="C", copy=True)  # never alias the caller's tensor
    if not np.isfinite(w).all():
        raise InvalidInputError(f"{what} contains NaN or inf; prune or fix the weights first")
    return w


def as_bias(bias: Any, n: int) -> tuple[np.ndarray, bool]:
    """(fp32 bias of length ``n``, whether one was given); zeros when ``bias`` is None."""
    if bias is None:
        return np.zeros(n, np.float32), False
    if hasattr(bias, "detach"):
        bias = bias.detach().cpu().numpy()
    b = np.array(bias, dtype=np.float32, order="C", copy=True)
    if b.shape != (n,):
        raise InvalidInputError(f"bias must have shape ({n},) to match the weight; got {b.shape}")
    if not np.isfinite(b).all():
        raise InvalidInputError("bias contains NaN or inf")
    return b, True


def as_activations(x: Any, last: int, what: str = "x") -> np.ndarray:
    """``x`` as a C-contiguous fp32 numpy array whose last axis has ``last`` entries.

    Other float or int dtypes and non-contiguous arrays are converted (copied).
    """
    if not isinstance(x, np.ndarray):
        raise InvalidInputError(
            f"{what} must be a numpy array; got {type(x).__name__} (spdy.runtime's modules take torch tensors)"
        )
    if x.ndim < 1 or x.shape[-1] != last:
        raise InvalidInputError(f"{what} must have {last} features in its last axis; got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise InvalidInputError(f"{what} must be numeric (it is converted to float32); got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def check_out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """A writable C-contiguous fp32 output of ``shape``: ``out`` itself, or a new array."""
    if out is None:
        return np.empty(shape, np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape:
        got = f"{type(out).__name__} {getattr(out, 'dtype', '')} {getattr(out, 'shape', '')}"
        raise InvalidInputError(f"out must be a float32 numpy array of shape {shape}; got {got}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidInputError("out must be C-contiguous and writeable")
    return out

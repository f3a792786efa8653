"""Calibration capture: ``H = sum_x x^T x`` of every prunable layer's inputs.

Forward pre-hooks see each layer's input batch by batch; nothing but the running
sum is kept, so memory is constant in the number of calibration samples. A
Linear layer's rows ``x`` are its input tokens (all leading dims flattened); a
Conv2d layer's rows are its unfolded input patches (``F.unfold`` with the
layer's kernel, stride, padding and dilation), in the order of
``weight.reshape(out, -1)``. Products are taken and summed in float64. Layers
that read the very same input tensor (for example the query, key and value
projections of an attention block) share one product per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spdy.errors import InvalidInputError
from spdy.models.base import ModelBundle, get_module
from spdy.types import LayerSpec

log = logging.getLogger(__name__)

# Rows per float64 product: bounds the temporary copy of a large unfolded conv input.
_ROW_CHUNK = 8192


@dataclass
class HessianStats:
    """``H = sum x^T x`` (float64, ``(in, in)``) over ``n_rows`` input rows of one layer."""

    H: torch.Tensor
    n_rows: int = 0


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input rows the layer multiplies with ``W^T``: tokens (Linear) or patches (Conv2d)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if x.ndim == 3:
            x = x.unsqueeze(0)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise InvalidInputError(f"cannot capture inputs of a {type(module).__name__}; only Linear and Conv2d are prunable")


def _gram(rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = rows^T rows`` in float64 (``out`` is a reused buffer)."""
    for i in range(0, rows.shape[0], _ROW_CHUNK):
        x = rows[i : i + _ROW_CHUNK].to(torch.float64)
        if i == 0:
            torch.mm(x.t(), x, out=out)
        else:
            out.addmm_(x.t(), x)
    return out


@torch.no_grad()
def capture_hessians(
    bundle: ModelBundle,
    layers: Sequence[LayerSpec],
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, HessianStats]:
    """One pass over the calibration batches; returns ``{layer name: HessianStats}``."""
    modules = {spec.name: get_module(bundle.model, spec.name) for spec in layers}
    stats: dict[str, HessianStats] = {}
    for spec in layers:
        d = spec.matrix_shape[1]
        stats[spec.name] = HessianStats(torch.zeros((d, d), dtype=torch.float64))
    # This batch's products, by input tensor: layers reading the same tensor share one product.
    shared: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, int]] = {}
    # Product buffers by width, reused across batches (no fresh 8*d*d allocation per batch).
    pool: dict[int, list[torch.Tensor]] = {}
    in_use: dict[int, int] = {}

    def buffer(d: int) -> torch.Tensor:
        bufs = pool.setdefault(d, [])
        k = in_use.get(d, 0)
        if k == len(bufs):
            bufs.append(torch.empty((d, d), dtype=torch.float64))
        in_use[d] = k + 1
        return bufs[k]

    def hook(name: str) -> Callable[..., None]:
        module = modules[name]

        def _h(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach()
            if isinstance(module, nn.Conv2d):
                key: tuple[Any, ...] = (id(x), module.kernel_size, module.stride, module.padding, module.dilation)
            else:
                key = (id(x),)
            hit = shared.get(key)
            if hit is None or hit[0] is not x:
                rows = layer_rows(module, x)
                if rows.shape[1] != stats[name].H.shape[0]:
                    raise InvalidInputError(
                        f"layer {name!r} saw inputs of width {rows.shape[1]}; its weight expects {stats[name].H.shape[0]}"
                    )
                # keeping x alive in `shared` keeps its id unique during this batch
                hit = (x, _gram(rows, buffer(rows.shape[1])), rows.shape[0])
                shared[key] = hit
            st = stats[name]
            st.H += hit[1]
            st.n_rows += hit[2]

        return _h

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(bundle.calibration), desc="calibration", unit="batch", leave=False, disable=None)
    try:
        bundle.model.eval()
        for i, batch in enumerate(bundle.calibration):
            bundle.forward(bundle.model, batch)
            shared.clear()
            in_use.clear()
            if bar is not None:
                bar.update(1)
            if on_batch is not None:
                on_batch(i)
    finally:
        for h in handles:
            h.remove()
        shared.clear()
        if bar is not None:
            bar.close()
    missed = [n for n, st in stats.items() if st.n_rows == 0]
    if missed:
        raise InvalidInputError(
            f"layers {missed[:5]} (of {len(missed)}) never ran on the calibration batches; "
            "exclude them or check the forward function"
        )
    return stats

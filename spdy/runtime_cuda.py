"""Run a pruned model on an NVIDIA GPU: 2:4 layers on sparse tensor cores, the rest dense (or CSR).

>>> from spdy.runtime_cuda import move_batch, to_gpu_model
>>> gpu_model = to_gpu_model(model, solution, database=db, dtype="bfloat16")
>>> with torch.inference_mode():
...     out = gpu_model(**move_batch(inputs, "cuda", torch.bfloat16))

Each layer's :class:`~spdy.choices.Choice` decides its module:

* ``2:4`` — :class:`SemiStructuredLinear`: ``F.linear`` with the
  weight compressed by ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, or CUTLASS
  when torch falls back to it). Needs a Linear layer, float16 or bfloat16, and a weight of
  ``out % 32 == 0`` rows and ``in % 64 == 0`` columns (the stricter of torch's two 2:4
  backends); the weight must keep at most 2 of every 4 consecutive inputs (checked). Where
  ``formats[layer] == "dense"`` (the profile found the dense kernel faster for that layer's
  2:4 weight) it runs dense, as the profile's time assumes.
* ``4:8`` — no torch kernel exists for 4:8 (cuSPARSELt's sparse tensor cores run 2:4 for
  half precision), and a 4:8 weight is not 2:4 in general: the layer runs dense, with its
  4:8 zeros (correct output, no speedup; logged).
* ``unstructured`` — dense, or torch's CSR (:class:`CsrLinear`; ``formats[layer] == "csr"``, e.g. the format the
  profile measured fastest for that level; Linear only).
* ``dense`` — dense.

Everything but the GPU work is plain Python and runs (and is tested) on the CPU:
:func:`resolve_dtype`, :func:`semi_structured_problem`, :func:`nm_violations`,
:func:`check_nm` and :func:`plan_gpu_model`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from spdy._modules import CsrLinear, SemiStructuredLinear, move_batch, swap_modules
from spdy.choices import DENSE, UNSTRUCTURED, Choice, parse_pattern
from spdy.errors import BackendUnavailableError, InvalidInputError
from spdy.models.base import get_module

log = logging.getLogger(__name__)

__all__ = [
    "DTYPES", "SEMI_STRUCTURED", "MIN_BLOCK", "CsrLinear", "SemiStructuredLinear", "LayerPlan", "GpuPlan",
    "resolve_dtype", "semi_structured_problem", "nm_violations", "check_nm", "plan_gpu_model", "to_gpu_model",
    "move_batch",
]

#: dtype names accepted by :func:`resolve_dtype`
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
#: the N:M pattern torch has GPU kernels for (half precision)
SEMI_STRUCTURED = "2:4"
#: smallest weight blocks of torch's 2:4 backends for fp16/bf16: (rows, cols); CUTLASS needs (32, 64),
#: cuSPARSELt (16, 16); both dimensions must be multiples. We require the stricter one.
MIN_BLOCK = (32, 64)

# module kinds of a plan
MODULE_DENSE = "dense"
MODULE_SEMI = "2:4"
MODULE_CSR = "csr"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float16"``/``"fp16"``/``"half"``/``"bfloat16"``/``"bf16"`` or the torch dtype itself.

    2:4 kernels run in half precision only, so float32 is refused here."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
        raise InvalidInputError(f"the GPU runtime runs float16 or bfloat16 (2:4 kernels need half precision); got {dtype}")
    dt = DTYPES.get(str(dtype).lower())
    if dt is None:
        raise InvalidInputError(
            f"unknown GPU dtype {dtype!r}; use float16 (fp16) or bfloat16 (bf16): 2:4 kernels need half precision"
        )
    return dt


def semi_structured_problem(kind: str, weight_shape: tuple[int, ...], dtype: str | torch.dtype) -> str | None:
    """None if a layer of this kind and weight shape can run as a 2:4 semi-structured weight in
    ``dtype``; otherwise why not, in words."""
    if kind != "linear":
        return f"2:4 kernels run Linear layers only; this is a {kind}"
    try:
        resolve_dtype(dtype)
    except InvalidInputError as exc:
        return str(exc)
    rows, cols = int(weight_shape[0]), int(np.prod(weight_shape[1:]))
    r, c = MIN_BLOCK
    if rows % r or cols % c:
        return f"weight {rows}x{cols}: torch's 2:4 kernels need rows a multiple of {r} and columns a multiple of {c}"
    return None


def nm_violations(weight: np.ndarray | torch.Tensor, n: int = 2, m: int = 4) -> int:
    """Number of row-groups of ``m`` consecutive inputs holding more than ``n`` nonzeros
    (the weight viewed as ``(out, in...)`` flattened to ``(out, -1)``)."""
    w = weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
    rows = w.reshape(w.shape[0], -1)
    if rows.shape[1] % m:
        raise InvalidInputError(f"an N:M check needs the input size ({rows.shape[1]}) to be a multiple of m={m}")
    nnz = (rows.reshape(rows.shape[0], -1, m) != 0).sum(-1)
    return int((nnz > n).sum())


def check_nm(weight: np.ndarray | torch.Tensor, n: int = 2, m: int = 4, name: str = "weight") -> None:
    """Raise :class:`InvalidInputError` unless every row-group of ``m`` keeps at most ``n`` nonzeros."""
    bad = nm_violations(weight, n, m)
    if bad:
        raise InvalidInputError(
            f"{name} is not {n}:{m} sparse: {bad} groups of {m} consecutive inputs hold more than {n} nonzeros. "
            f"Stitch the database's {n}:{m} weight (Choice.nm('{n}:{m}')) or prune it with spdy.profilers.pruning.prune_n_m"
        )


@dataclass(frozen=True)
class LayerPlan:
    """How one layer runs on the GPU: ``module`` is ``"dense"``, ``"2:4"`` or ``"csr"``;
    ``reason`` says why a layer runs otherwise than its choice suggests."""

    name: str
    choice: Choice
    module: str
    reason: str = ""


@dataclass(frozen=True)
class GpuPlan:
    """The per-layer modules of a GPU model and its dtype (what :func:`to_gpu_model` builds)."""

    dtype: str
    layers: tuple[LayerPlan, ...]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lp in self.layers:
            out[lp.module] = out.get(lp.module, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "modules": self.counts(),
            "layers": {lp.name: {**lp.choice.to_json(), "module": lp.module, **({"reason": lp.reason} if lp.reason else {})}
                       for lp in self.layers},
        }


def _as_choices(choices: Mapping[str, Choice] | Any) -> dict[str, Choice]:
    if isinstance(choices, Mapping):
        out = dict(choices)
    elif hasattr(choices, "layers") and hasattr(choices, "choices"):
        out = dict(zip(choices.layers, choices.choices))
    else:
        raise InvalidInputError(
            f"choices must map layer names to spdy.choices.Choice (or be a Solution); got {type(choices).__name__}"
        )
    bad = [n for n, c in out.items() if not isinstance(c, Choice)]
    if bad:
        raise InvalidInputError(f"layers {bad[:5]} are not given a spdy.choices.Choice (got {type(out[bad[0]]).__name__})")
    return out


def plan_gpu_model(
    model: nn.Module,
    choices: Mapping[str, Choice] | Any,
    dtype: str | torch.dtype = "float16",
    formats: Mapping[str, str] | None = None,
    strict: bool = True,
) -> GpuPlan:
    """Decide each named layer's GPU module (no GPU needed; see the module doc).

    ``choices``: ``{layer: Choice}`` or a :class:`~spdy.types.Solution` (then its
    ``formats`` are used unless ``formats`` is given). A 2:4 choice on a layer that cannot
    run 2:4 (not Linear, shape not a multiple of the kernel block) raises with
    ``strict``, else runs dense with the reason recorded (and logged).
    """
    dt = resolve_dtype(dtype)
    if formats is None and getattr(choices, "formats", None) is not None:
        formats = dict(zip(choices.layers, choices.formats))
    chosen = _as_choices(choices)
    formats = dict(formats or {})
    plans = []
    for name, choice in chosen.items():
        mod = get_module(model, name)
        w = getattr(mod, "weight", None)
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or not isinstance(w, torch.Tensor):
            raise InvalidInputError(f"{name!r} is not a Linear or Conv2d layer of the model; got {type(mod).__name__}")
        kind = "linear" if isinstance(mod, nn.Linear) else "conv2d"
        module, reason = MODULE_DENSE, ""
        if choice.pattern == SEMI_STRUCTURED:
            why = semi_structured_problem(kind, tuple(w.shape), dt)
            if why is None and formats.get(name) == MODULE_DENSE:
                reason = "the profile measured the dense kernel faster than 2:4 here; runs dense (with its 2:4 zeros)"
            elif why is None:
                module = MODULE_SEMI
            elif strict:
                raise InvalidInputError(f"layer {name!r} cannot run 2:4 on the GPU: {why}. Pass strict=False to run it dense")
            else:
                reason = why + "; runs dense"
        elif choice.is_nm:
            nm = parse_pattern(choice.pattern)
            reason = f"torch has no {nm.name} kernel; runs dense (with its {nm.name} zeros)"
        elif choice.pattern == UNSTRUCTURED and formats.get(name) == MODULE_CSR:
            if kind == "linear":
                module = MODULE_CSR
            else:
                reason = "CSR runs Linear layers only; runs dense"
        elif choice.pattern not in (DENSE, UNSTRUCTURED):  # pragma: no cover - Choice validates patterns
            raise InvalidInputError(f"unknown pattern {choice.pattern!r}")
        if reason:
            log.warning("layer %s (%s): %s", name, choice.label, reason)
        plans.append(LayerPlan(name, choice, module, reason))
    return GpuPlan(str(dt).replace("torch.", ""), tuple(plans))


def to_gpu_model(
    model: nn.Module,
    choices: Mapping[str, Choice] | Any,
    *,
    database: Any = None,
    dtype: str | torch.dtype = "float16",
    device: str | torch.device = "cuda",
    formats: Mapping[str, str] | None = None,
    inplace: bool = False,
    strict: bool = True,
) -> nn.Module:
    """The model on the GPU in ``dtype``, each named layer as its choice says (see the module doc).

    With ``database`` (a :class:`~spdy.database.Database`), the chosen weights are stitched in
    first; otherwise the model must already hold them (2:4 weights are checked). The input
    batch must be moved to ``device`` and cast to ``dtype`` by the caller (e.g.
    :func:`move_batch`). Returns a copy unless ``inplace``;
    the plan is on the result as ``spdy_gpu_plan``.
    """
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "the GPU runtime needs CUDA: torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); run on a machine with an "
            "NVIDIA GPU and a CUDA build of torch"
        )
    dt = resolve_dtype(dtype)
    chosen = _as_choices(choices)
    if formats is None and getattr(choices, "formats", None) is not None:
        formats = dict(zip(choices.layers, choices.formats))
    m = model if inplace else copy.deepcopy(model)
    if database is not None:
        database.stitch(m, chosen)
    plan = plan_gpu_model(m, chosen, dt, formats, strict)
    for lp in plan.layers:
        if lp.module == MODULE_SEMI:
            check_nm(get_module(m, lp.name).weight, 2, 4, name=f"the weight of layer {lp.name!r}")
    m = m.to(device=device, dtype=dt).eval().requires_grad_(False)
    modules: dict[str, nn.Module] = {}
    with torch.no_grad():
        for lp in plan.layers:
            if lp.module == MODULE_DENSE:
                continue
            old = get_module(m, lp.name)
            w = old.weight.detach().contiguous()
            b = None if old.bias is None else old.bias.detach()
            new = SemiStructuredLinear(w, b) if lp.module == MODULE_SEMI else CsrLinear(w, b)
            modules[lp.name] = new.eval()
    swap_modules(m, modules)
    m.spdy_gpu_plan = plan  # type: ignore[assignment]
    log.info("GPU model (%s): %s", plan.dtype, ", ".join(f"{k} x{v}" for k, v in sorted(plan.counts().items())))
    return m

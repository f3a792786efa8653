"""Shared helpers for the benchmark scripts: timing statistics, JSON output, a layer on the kernels' tile layout."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def block_ms(fn: Callable[[], Any], calls: int) -> float:
    """Median milliseconds per call over ``calls`` calls of ``fn`` (no warm-up)."""
    return statistics.median(time_calls(fn, calls, warmup=0)) * 1e3


def summary(samples: list[float]) -> dict[str, float]:
    med = statistics.median(samples)
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [med, med, med]
    return {"median": med, "min": min(samples), "iqr_rel": (q[2] - q[0]) / med if med else 0.0, "n": len(samples)}


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def minilm_scorer(bundle: Any) -> Callable[[Any], dict[str, float]]:
    """``model -> held-out scores`` of a pruned MiniLM: Lee-50 Pearson / Spearman correlation with the
    human similarity ratings; ``lee50_agreement``, the Spearman correlation of its 1,225 Lee-50 pair
    similarities with the dense model's (how well it keeps the dense model's ranking of document
    pairs: 1 for the dense model, which the human correlations are not a measure of, since a pruned
    model can score above the dense one there); and the mean cosine similarity to the dense model's
    embeddings on the lee_background documents after the ``bundle``'s calibration documents."""
    import torch
    from scipy import stats

    from spdy.models.minilm import embed, lee50_correlations, lee50_similarities, lee_background_docs, load_encoder

    _, tok = load_encoder()
    start = bundle.meta.get("offset", 0) + bundle.meta.get("n_calibration", 128)
    heldout = lee_background_docs()[start:]
    with torch.no_grad():
        dense = embed(bundle.model, tok, heldout)
    dense_pairs = lee50_similarities(bundle.model, tok)

    def score(model: Any) -> dict[str, float]:
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(embed(model, tok, heldout), dense, dim=-1).mean()
        lee = lee50_correlations(model, tok)
        agree = float(stats.spearmanr(lee50_similarities(model, tok), dense_pairs)[0])
        return {"lee50_pearson": lee["pearson"], "lee50_spearman": lee["spearman"], "lee50_agreement": agree,
                "heldout_cosine": float(cos)}

    return score


def linear_tiles_runner(p: Any, x2: Any, threads: int | None = None) -> Callable[[], None]:
    """A runner of ``spdy.kernels._spmm.linear_tiles`` for the sparse prepared layer ``p`` on ``x2``
    [tokens, in] (fp32), packed into the tile layout once; nothing is packed or unpacked per call.
    Its ``output()`` gives the last result as rows [tokens, out] (unpacked then, not timed)."""
    import numpy as np

    from spdy.kernels import _spmm
    from spdy.kernels._workspace import aligned_empty
    from spdy.kernels.ffn import fused_threads

    s, tokens, O = p.sparse, x2.shape[0], p.out_features
    Tpad, n = _spmm.padded_tokens_py(tokens), fused_threads(tokens, threads)
    xt, yt = aligned_empty(Tpad * p.in_features), aligned_empty(Tpad * O)
    _spmm.pack_tiles(np.ascontiguousarray(x2, dtype=np.float32).reshape(-1), 1, tokens, Tpad, p.in_features, xt, n)
    args = (xt, 1, tokens, Tpad, p.in_features, O, s.ptr, s.n_panels, s.col, s.val, s.blocked, p.bias, yt, n)

    def run() -> None:
        _spmm.linear_tiles(*args)

    def output() -> Any:
        rows = np.empty(tokens * O, np.float32)
        _spmm.unpack_tiles(yt, 1, tokens, Tpad, O, rows, n)
        return rows.reshape(tokens, O)

    run.output = output  # type: ignore[attr-defined]
    return run

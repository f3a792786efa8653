"""BERT-shaped encoders with seeded random weights, as a user's ``package.module:factory`` model.

``scripts/bench_scale.py`` loads them through :func:`spdy.models.base.load_model`
(``"bert_shapes:factory"`` with this folder on ``sys.path``), the path a user's own
model takes; the zero-argument factories work from the command line too::

    PYTHONPATH=scripts spdy profile --model bert_shapes:bert_base --threads 2 -o base.json
    PYTHONPATH=scripts spdy database build --model bert_shapes:bert_base --threads 2 -o db/base

The encoders are ``transformers.BertModel`` built from a ``BertConfig`` (no pooler, as
all-MiniLM-L6-v2; nothing is downloaded) with weights drawn from ``torch.manual_seed(seed)``
by transformers' own initialiser: random weights cost what trained ones cost. The output is
the mean-pooled last hidden state and the loss the cosine distance to the dense model's, as
for the built-in MiniLM. Calibration: ``calibration="text"`` (default) tokenises the first
``n_calibration`` documents of gensim's ``lee_background.cor`` with the all-MiniLM-L6-v2
tokenizer (vocabulary 30522, shared by every shape); ``"random"`` draws uniform token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from spdy.errors import InvalidInputError
from spdy.models.base import ModelBundle, cosine_distance
from spdy.models.minilm import embed_forward  # mean-pooled last hidden state, as the built-in MiniLM

VOCAB = 30522


@dataclass(frozen=True)
class Shape:
    """An encoder's size: ``layers`` blocks of width ``hidden`` with ``heads`` heads and an
    ``intermediate``-wide MLP."""

    layers: int
    hidden: int
    intermediate: int
    heads: int

    @property
    def label(self) -> str:
        return f"{self.layers}x{self.hidden}"

    def encoder_params(self) -> int:
        """Weights and biases of the prunable Linear layers (6 per block)."""
        h, i = self.hidden, self.intermediate
        return self.layers * (4 * (h * h + h) + (h * i + i) + (i * h + h))


SHAPES: dict[str, Shape] = {
    "tiny": Shape(2, 64, 256, 2),  # for the smoke test
    "minilm": Shape(6, 384, 1536, 12),  # all-MiniLM-L6-v2
    "base": Shape(12, 768, 3072, 12),  # BERT-base
    "large": Shape(24, 1024, 4096, 16),  # BERT-large
}


def build_encoder(shape: Shape, seed: int = 0) -> torch.nn.Module:
    """A ``BertModel`` of ``shape`` without pooler, weights from ``torch.manual_seed(seed)``, in eval mode."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, intermediate_size=shape.intermediate, max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(config, add_pooling_layer=False)
    return model.eval()


def calibration_batches(kind: str, n: int, seq_len: int, batch_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences of ``seq_len`` tokens in batches of ``batch_size``: lee_background.cor text
    (``kind="text"``) or uniform random token ids (``"random"``, attention on every token)."""
    if kind == "text":
        import transformers

        from spdy.models.minilm import lee_background_docs, model_dir, tokenize

        docs = lee_background_docs()
        if n > len(docs):
            raise InvalidInputError(f"lee_background.cor has {len(docs)} documents; asked for {n}")
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)
        return [tokenize(tok, docs[i : i + batch_size], seq_len) for i in range(0, n, batch_size)]
    if kind == "random":
        g = torch.Generator().manual_seed(seed + 1)
        out = []
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            ids = torch.randint(1000, VOCAB, (b, seq_len), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "token_type_ids": torch.zeros_like(ids)})
        return out
    raise InvalidInputError(f"calibration must be 'text' or 'random'; got {kind!r}")


def factory(shape: str = "minilm", n_calibration: int = 64, seq_len: int = 128, batch_size: int = 8,
            calibration: str = "text", seed: int = 0) -> ModelBundle:
    """The ``shape`` encoder (``tiny``, ``minilm``, ``base``, ``large``) with its calibration set;
    the example (deployment) batch is one sequence of ``seq_len`` tokens."""
    if shape not in SHAPES:
        raise InvalidInputError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if n_calibration < 1 or batch_size < 1 or seq_len < 2:
        raise InvalidInputError(f"need n_calibration >= 1, batch_size >= 1, seq_len >= 2; got "
                                f"{n_calibration}, {batch_size}, {seq_len}")
    s = SHAPES[shape]
    model = build_encoder(s, seed)
    batches = calibration_batches(calibration, n_calibration, seq_len, batch_size, seed)
    example = {k: v[:1].clone() for k, v in batches[0].items()}
    meta: dict[str, Any] = {"shape": shape, "layers": s.layers, "hidden": s.hidden, "intermediate": s.intermediate,
                            "heads": s.heads, "weights": f"random (torch.manual_seed({seed}))",
                            "calibration": calibration, "n_calibration": n_calibration, "seq_len": seq_len,
                            "batch_size": batch_size}
    return ModelBundle(name=f"bert-{shape}-shape", model=model, calibration=batches, example=example,
                       forward=embed_forward, loss=cosine_distance, meta=meta)


def minilm_shape() -> ModelBundle:
    return factory("minilm")


def bert_base() -> ModelBundle:
    return factory("base")


def bert_large() -> ModelBundle:
    return factory("large")

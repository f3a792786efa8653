from __future__ import annotations

import pytest
import torch

minilm = pytest.importorskip("spdy.models.minilm")


@pytest.fixture(scope="module")
def bundle():
    from spdy.models.base import load_model

    return load_model("minilm", n_calibration=8, batch_size=4)


def test_minilm_layers_and_shapes(bundle) -> None:
    specs = bundle.layers()
    assert len(specs) == 36  # 6 blocks x (q, k, v, attention out, intermediate, output)
    shapes = {s.weight_shape for s in specs}
    assert shapes == {(384, 384), (1536, 384), (384, 1536)}
    assert all(s.input_shape[:2] == (1, 128) for s in specs)
    assert bundle.n_samples == 8 and len(bundle.calibration) == 2


def test_minilm_embeddings_are_real(bundle) -> None:
    # the real model separates related from unrelated sentences
    model, tok = minilm.load_encoder()
    e = minilm.embed(model, tok, ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply."])
    e = torch.nn.functional.normalize(e, dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2


def test_calibration_is_lee_background(bundle) -> None:
    docs = minilm.lee_background_docs()
    assert len(docs) == 300
    assert len(minilm.lee50_docs()) == 50
    assert bundle.calibration[0]["input_ids"].shape == (4, 128)


def test_bad_calibration_size() -> None:
    from spdy.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="300 documents"):
        minilm.load_minilm(n_calibration=400)


def test_lee50_benchmark_on_dense_model() -> None:
    model, tok = minilm.load_encoder()
    r = minilm.lee50_correlations(model, tok)
    # the dense model agrees with human ratings (a random encoder would be near 0)
    assert 0.5 < r["pearson"] < 0.9 and 0.3 < r["spearman"] < 0.9
    assert minilm.heldout_cosine(model, model, tok, first=295) == pytest.approx(1.0, abs=1e-5)


def test_lee50_similarities_are_the_pairs_cosines() -> None:
    """The 1,225 pair similarities, row by row over the upper triangle, against cosines of the
    embeddings computed here pair by pair."""
    import torch

    model, tok = minilm.load_encoder()
    sims = minilm.lee50_similarities(model, tok)
    assert sims.shape == (50 * 49 // 2,)
    docs = minilm.lee50_docs()
    e = minilm.embed(model, tok, docs[:3])
    cos = torch.nn.functional.cosine_similarity
    # pairs (0, 1), (0, 2) open the first row; (1, 2) opens the second, after 49 pairs
    assert sims[0] == pytest.approx(float(cos(e[0], e[1], dim=0)), abs=1e-4)
    assert sims[1] == pytest.approx(float(cos(e[0], e[2], dim=0)), abs=1e-4)
    assert sims[49] == pytest.approx(float(cos(e[1], e[2], dim=0)), abs=1e-4)


def test_load_encoder_leaves_the_process_alone() -> None:
    """Loading reads the package's folder only and changes no environment variable or log level."""
    import logging
    import os

    pytest.importorskip("transformers")
    env = dict(os.environ)
    level = logging.getLogger("transformers").getEffectiveLevel()
    model, tok = minilm.load_encoder()
    assert dict(os.environ) == env
    assert logging.getLogger("transformers").getEffectiveLevel() == level

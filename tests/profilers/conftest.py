from __future__ import annotations

import sys
from pathlib import Path

import pytest

import spdy.profilers  # noqa: F401  - import the spdy kernels before torch (one OpenMP runtime)

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the tests here import TEST_POLICY from this file
    sys.path.insert(0, str(HERE))

from spdy.profilers import available_backends, get_backend  # noqa: E402
from spdy.testing import backends as conformance  # noqa: E402

GRID3 = conformance.GRID3
TEST_POLICY = conformance.TEST_POLICY

BACKENDS = sorted(available_backends())


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    """Every registered backend; unavailable ones are skipped with the reason."""
    reason = available_backends()[request.param]
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    # no process-wide ORT pool in a test process: other tests create ORT sessions of their own
    options = {"shared_pool": False} if request.param == "ort-cpu" else {}
    return get_backend(request.param, threads=1, policy=TEST_POLICY, **options)


@pytest.fixture(scope="session")
def tiny_mlp():
    return conformance.tiny_mlp()


@pytest.fixture(scope="session")
def tiny_conv():
    return conformance.tiny_conv()


def tiny_bert_bundle():
    """A 2-layer BERT encoder (64 wide, random weights, seed 0) with one sequence of 64 tokens:
    the smallest model whose encoder forward has every fused block (feed-forward, query/key/value,
    attention output). Skips where transformers is missing."""
    transformers = pytest.importorskip("transformers")
    import torch

    from spdy.models.base import ModelBundle

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=256, max_position_embeddings=80, attn_implementation="sdpa")
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 200, (1, 64))
    return ModelBundle("tiny-bert", model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                       forward=lambda m, b: m(**b).last_hidden_state)

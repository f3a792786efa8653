"""scripts/bench_layer_forward.py: another revision's layer forward is loaded and bound to its own helpers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_layer_forward import _function, load_version  # noqa: E402


def test_function_cuts_one_definition() -> None:
    src = "x = 1\ndef a(y):\n    return y\n\n\ndef b():\n    pass\n\nclass C:\n    pass\n"
    assert _function(src, "a").strip() == "def a(y):\n    return y"
    assert _function(src, "b").strip() == "def b():\n    pass"
    assert _function(src, "missing") is None


@pytest.mark.skipif(shutil.which("git") is None or subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                    capture_output=True).returncode != 0, reason="needs the project's git history")
def test_load_version_binds_the_revisions_own_helpers() -> None:
    from spdy import runtime

    layer, unsupported = load_version("HEAD")
    assert layer.__name__ == "_bert_layer" and unsupported.__name__ == "unsupported"
    assert layer is not runtime._bert_layer  # a copy, compiled from the revision's source
    assert layer.__globals__["_fusable_ffn"] is not runtime._fusable_ffn


@pytest.mark.skipif(shutil.which("git") is None or subprocess.run(["git", "rev-parse", "ee5b432^"], cwd=ROOT,
                    capture_output=True).returncode != 0, reason="needs the project's git history")
def test_an_older_layer_forward_is_called_without_the_switches_it_lacks() -> None:
    import torch

    from spdy import runtime

    # before ee5b432 the layer forward took no fuse_out: the current encoder's seventh argument is left off
    layer, _unsupported = load_version("ee5b432^")
    assert layer.__wrapped__.__code__.co_argcount == 6 < runtime._bert_layer.__code__.co_argcount
    bert = pytest.importorskip("transformers").BertModel(pytest.importorskip("transformers").BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).eval()
    x = torch.randn(1, 5, 32)
    with torch.inference_mode():
        assert layer(bert.encoder.layer[0], x, None, None, True, True, True).shape == (1, 5, 32)

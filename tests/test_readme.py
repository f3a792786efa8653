"""The README's library example for a user's own model runs as written (~35 s on 2 cores).

The block is taken from README.md itself, so an edit that breaks it fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_own_model_example() -> None:
    blocks = [b for b in python_blocks() if "nn.Sequential" in b]
    assert len(blocks) == 1, "README should show one library example with a user's nn.Sequential"


def test_own_model_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    (block,) = [b for b in python_blocks() if "nn.Sequential" in b]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPDY_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)

    res, model = scope["res"], scope["model"]
    result = json.loads((tmp_path / "out" / "mlp" / "result.json").read_text())
    assert result["target_speedup"] == pytest.approx(1.5) and result["reference"]["asked"] == "torch"
    assert res.measured_speedup > 1.0
    # spdy.apply put the stored weights in place: each layer's zeros match its sparsity.
    for name, layer in result["layers"].items():
        weight = dict(model.named_modules())[name].weight
        zeros = float((weight == 0).float().mean())
        assert zeros == pytest.approx(layer["sparsity"], abs=0.02), name

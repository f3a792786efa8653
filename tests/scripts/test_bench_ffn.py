"""scripts/bench_ffn.py: the fused block and the four operators agree (checked inside), both are timed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_ffn import main, measure  # noqa: E402


def test_measure_reports_both_paths_and_the_script_writes_json(tmp_path):
    r = measure(0.9, tokens=40, rounds=2, calls=2, layer_norm=True)
    assert all(np.isfinite(r[k]) and r[k] > 0 for k in ("fused_us", "alone_us", "fused_over_alone"))
    out = tmp_path / "ffn.json"
    assert main(["--threads", "1", "--sparsity", "1.0", "--rounds", "2", "--calls", "2", "--tokens", "20",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["threads"], row["sparsity"]) for row in rows] == [(1, 1.0)]

"""scripts/validation_state.py: the state read after the fact from a saved validation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from validation_state import main, post_hoc  # noqa: E402


def _saved(scale: float, offset: float, noise: np.ndarray) -> dict:
    pred = np.linspace(6e-3, 16e-3, len(noise))
    meas = (scale * pred + offset) * (1 + noise)
    dense_pred, dense_meas = 20e-3, scale * 20e-3 + offset
    return {"dense_total_s": dense_pred, "validation": [
        {"predicted_s": p, "measured_s": m, "dense_measured_s": dense_meas,
         "error": (p / dense_pred) / (m / dense_meas) - 1} for p, m in zip(pred, meas)]}


def test_a_machine_that_moved_along_a_line_leaves_no_error_once_the_state_is_read(tmp_path: Path) -> None:
    # every model 10% slower and 1 ms faster per pass: the plain error is large, the state-read one zero
    d = _saved(1.1, -1e-3, np.zeros(6))
    r = post_hoc(d, 3)
    assert r["plain_median_abs"] > 0.03 and r["choices"] == 20
    assert r["state_median_abs"] == pytest.approx(0.0, abs=1e-12) and r["state_median_abs_p90"] == pytest.approx(0.0, abs=1e-12)
    # noise off the line comes through, at about its own size
    noisy = post_hoc(_saved(1.1, -1e-3, np.array([0.02, -0.02, 0.01, -0.01, 0.02, -0.02])), 3)
    assert 0.003 < noisy["state_median_abs"] < 0.05
    f = tmp_path / "p.json"
    f.write_text(json.dumps(d))
    out = tmp_path / "out.json"
    assert main([str(f), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["profiles"]["p.json"]["models"] == 6

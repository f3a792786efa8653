"""Smoke test of scripts/bench_scale.py: every stage in its child process on a 2 x 64 encoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

pytest.importorskip("transformers")


def test_bench_scale_tiny_shape_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_scale.py"), "--shapes", "tiny", "--threads", "1",
           "--calibration", "random", "--n-calibration", "8", "--batch-size", "4", "--seq-len", "16",
           "--grid-levels", "0.5", "0.9", "--quick", "--fit-models", "0", "--evals", "1", "--dp-repeats", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = json.loads(out.read_text())
    assert d["fingerprint"]["threads"] == 1 and d["settings"]["calibration"]["kind"] == "random"
    tiny = d["shapes"]["tiny"]
    assert tiny["prunable_layers"] == 12
    st = tiny["stages"]
    assert all(st[s]["rc"] == 0 for s in ("profile", "database", "search")), st
    assert st["profile"]["layers"] == 12 and st["profile"]["levels"] == 3
    db = st["database"]
    assert db["layers"] == 12 and db["disk_bytes"] > 0 and db["capture_passes"] == 1
    assert sum(r["layers"] for r in db["layer_rates"].values()) == 12
    for s in st.values():  # each stage's own child: its peak RSS at least its RSS after setup
        assert s["peak_rss_bytes"] >= s["rss_after_setup_bytes"] > 0
    se = st["search"]
    assert se["dp_one_solve_ms"] > 0 and len(se["evals"]) == 1 and se["evals"][0]["stitch_s"] > 0
    assert "2x64" in proc.stdout and "DP ms" in proc.stdout  # the table

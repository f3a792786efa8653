"""scripts/bench_base_ops.py: a small run times both ops at each thread count and writes the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_base_ops import main  # noqa: E402


def test_small_run_reports_every_op_and_thread_count(tmp_path, capsys):
    out = tmp_path / "ops.json"
    assert main(["--threads", "1", "2", "--tokens", "20", "--heads", "2", "--ffn", "64", "--rounds", "2",
                 "--calls", "3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["records"]
    assert {(r["op"], r["threads"]) for r in rows} == {(op, t) for op in ("attention", "gelu") for t in (1, 2)}
    assert all(r["max_abs_diff"] < 1e-5 and r["torch_us"] > 0 and r["spdy_us"] > 0 for r in rows)
    assert data["fingerprint"]["cpu_model"]
    assert "spdy/torch" in capsys.readouterr().out

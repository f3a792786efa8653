"""scripts/bench_ort_modes.py: its block timer and per-thread CPU reading."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_ort_modes import block_ms, thread_ticks  # noqa: E402


def test_block_ms_is_the_median_call() -> None:
    assert 4.0 <= block_ms(lambda: time.sleep(0.005), 5) < 50.0


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task").exists(), reason="reads /proc (Linux)")
def test_thread_ticks_counts_a_busy_thread() -> None:
    before = thread_ticks()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.15:
        pass
    after = thread_ticks()
    assert os.getpid() in after  # the main thread's id is the process id
    assert after[os.getpid()] - before[os.getpid()] >= 0.1 * os.sysconf("SC_CLK_TCK")  # 150 ms of CPU spent

"""scripts/bench_round_order.py: the dense plan's two copies and the pruned models sit where the round says."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_round_order import round_plans, slots  # noqa: E402


def test_slots_name_the_copy_and_each_pruned_model_in_order() -> None:
    for n in (1, 2, 5, 10):
        dense, base = {"dense": 0}, {"base": 0}
        models = [{"model": i} for i in range(n)]
        plans = round_plans(dense, models, base)
        mid, at = slots(n)
        assert len(plans) == n + 3 and plans[0] == plans[mid] == dense and plans[mid] is not dense
        assert [plans[i] for i in at] == models and plans[-1] is base

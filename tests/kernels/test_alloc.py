"""retain_freed_memory: large buffers stop page-faulting in on every allocation (glibc)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spdy import kernels

PROBE = r"""
import json, resource
import numpy as np
from spdy.kernels import _alloc

def faults(rounds=5, n=16 << 20):       # 64 MiB of float32: above glibc's largest dynamic mmap threshold
    a = np.ones(n, np.float32); del a       # warm
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        a = np.ones(n, np.float32)          # touches every page
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

before = faults()
ok = _alloc.retain_freed_memory()
after = faults()
print(json.dumps({"before": before, "after": after, "ok": ok, "status": _alloc.allocator_status()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_memory_is_reused_without_page_faults() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["ok"] and r["status"]["retain_freed"]
    # with the defaults every 64 MiB buffer is mmap-ed afresh and faults its pages in
    # (2,720 faults for 5 buffers here; the kernel may map several pages per fault),
    # once freed memory is kept it is reused: (almost) none
    assert r["before"] >= 100
    assert r["after"] <= r["before"] / 10


def test_retain_is_idempotent_and_reported() -> None:
    first = kernels.retain_freed_memory()
    assert kernels.retain_freed_memory() == first
    assert kernels.allocator_status()["retain_freed"] == first


def test_spdy_cpu_backend_records_the_allocator() -> None:
    from spdy.profilers import get_backend

    fp = get_backend("spdy-cpu", threads=1).fingerprint()
    assert fp["allocator"]["retain_freed"] is sys.platform.startswith("linux")

"""N:M pattern choices: timed in profiles where a backend has a kernel (+inf where it has none), and
offered per layer by ``spdy search --patterns`` end to end."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TEST_POLICY

import spdy
from spdy.choices import Choice
from spdy.cli import main
from spdy.database import Database, build_database
from spdy.grid import SparsityGrid
from spdy.profile import choice_table, load_profile, save_profile
from spdy.profilers import DENSE, LayerChoice, get_backend, profile_model
from spdy.profilers.base import NO_KERNEL
from spdy.profilers.torch_backends import TorchCpuBackend, TorchCudaBackend
from spdy.runtime_cuda import nm_violations
from spdy.types import LayerSpec

GRID = SparsityGrid((0.0, 0.9))  # no 50 % level: every 50 % weight timed below is an N:M one


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The CLI's --threads and torch backends set torch's thread count process-wide: put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class CsrNMBackend(TorchCpuBackend):
    """torch-cpu that claims a 2:4 "kernel" (CSR on the N:M weight), to exercise the pattern path on a CPU."""

    name = "torch-cpu-nm-test"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nm_weights: list[np.ndarray] = []

    def pattern_formats(self, spec: LayerSpec, pattern: str) -> tuple[str, ...]:
        return ("csr",) if pattern == "2:4" and spec.kind == "linear" else ()

    def make_module(self, spec: LayerSpec, choice: LayerChoice) -> Any:
        if choice.fmt == "csr" and choice.sparsity == 0.5:
            self.nm_weights.append(np.array(choice.weight))
        return super().make_module(spec, choice)


@pytest.mark.parametrize("passes", [1, 2])
def test_profile_times_patterns_where_the_backend_has_a_kernel(tiny_mlp, tmp_path, passes: int) -> None:
    backend = CsrNMBackend(threads=1, policy=dataclasses.replace(TEST_POLICY, passes=passes))
    prof = profile_model(tiny_mlp, backend, GRID, patterns="2:4,4:8")
    L = len(prof.table.layers)
    assert prof.patterns == ("2:4", "4:8") and prof.pattern_times.shape == (L, 2)
    assert np.all(np.isfinite(prof.pattern_times[:, 0])) and np.all(prof.pattern_times[:, 0] > 0)
    assert np.all(np.isinf(prof.pattern_times[:, 1]))  # no 4:8 kernel
    assert all(f[0] in ("csr", DENSE) for f in prof.pattern_formats)
    assert all(f[1] == NO_KERNEL for f in prof.pattern_formats)
    assert prof.table.times.shape == (L, len(GRID))  # the grid part is unchanged
    # the pattern runners got N:M weights
    assert backend.nm_weights and all(nm_violations(w, 2, 4) == 0 for w in backend.nm_weights)
    assert all(np.isclose((w == 0).mean(), 0.5) for w in backend.nm_weights)
    save_profile(prof, tmp_path / "p.json")
    back = load_profile(tmp_path / "p.json")
    np.testing.assert_array_equal(back.pattern_times, prof.pattern_times)
    table = choice_table(back)
    assert table.choices[-2:] == (Choice.nm("2:4"), Choice.nm("4:8"))
    assert table.available[:, -2].all() and not table.available[:, -1].any()


def test_backend_without_nm_kernels_records_none(tiny_mlp, caplog) -> None:
    backend = get_backend("torch-cpu", threads=1, policy=TEST_POLICY)
    with caplog.at_level(logging.WARNING):
        prof = profile_model(tiny_mlp, backend, GRID, patterns=["2:4"])
    assert prof.patterns == ("2:4",) and np.all(np.isinf(prof.pattern_times))
    assert "has no 2:4 kernel for any layer" in caplog.text
    assert all(rec["patterns"] == {} for rec in prof.to_json()["layers"])


def test_torch_cuda_offers_2_4_as_its_own_choice_only_where_the_kernel_fits() -> None:
    # the checks are plain Python: exercise them without constructing the backend (it needs CUDA)
    b = object.__new__(TorchCudaBackend)
    b.dtype_name = "float16"
    lin = LayerSpec("a", "linear", (768, 3072), (32, 128, 3072))
    assert b.pattern_formats(lin, "2:4") == ("2:4",)
    assert b.pattern_formats(LayerSpec("b", "linear", (30, 64), (1, 8, 64)), "2:4") == ()
    assert b.pattern_formats(LayerSpec("c", "conv2d", (64, 64, 3, 3), (1, 64, 8, 8)), "2:4") == ()
    assert b.pattern_formats(lin, "4:8") == ()  # no 4:8 kernel in torch
    b.dtype_name = "bfloat16"
    assert b.pattern_formats(lin, "2:4") == ("2:4",)
    b.dtype_name = "float32"
    assert b.pattern_formats(lin, "2:4") == ()  # 2:4 needs half precision
    # grid levels hold unstructured weights: 2:4 is no longer one of their formats
    assert "2:4" not in b.layer_formats(lin, 0.6) and b.layer_formats(lin, 0.6) == (DENSE, "csr")


def test_cli_profile_patterns_flag(tmp_path, capsys) -> None:
    out = tmp_path / "p.json"
    rc = main(["-q", "profile", "--model", "spdy.testing.models:mlp", "--backend", "torch-cpu", "--threads", "1",
               "--grid-levels", "0.9", "--quick", "--patterns", "2:4", "-o", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["patterns"] == ["2:4"] and all(rec["patterns"] == {} for rec in d["layers"])
    rc = main(["-q", "profile", "--model", "spdy.testing.models:mlp", "--backend", "ort-cpu", "--dtype", "float16",
               "-o", str(tmp_path / "x.json")])
    assert rc == 1 and "--dtype applies to the torch backends" in capsys.readouterr().err
    assert math.isinf(load_profile(out).pattern_times[0, 0])


# --------------------------------------------------------------------------- spdy search --patterns


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A cache of this test's own."""
    monkeypatch.setenv("SPDY_CACHE", str(tmp_path / "cache"))


def test_search_takes_nm_choices_where_they_are_cheaper(tiny_mlp, tmp_path, cache, caplog,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    prof = profile_model(tiny_mlp, CsrNMBackend(threads=1, policy=TEST_POLICY), GRID, patterns="2:4", fit_models=0)
    # a 2:4 kernel twice as fast as the 90 % level, with less error under the prior: wherever
    # pruning pays, the DP takes 2:4
    cheap = np.where(np.isfinite(prof.pattern_times), 0.5 * prof.table.times[:, -1:], np.inf)
    prof = dataclasses.replace(prof, pattern_times=cheap)
    target = 1 + 0.6 * (choice_table(prof).max_speedup() - 1)
    db = build_database(tiny_mlp, tmp_path / "db", GRID, patterns="2:4")
    timed: list[np.ndarray] = []
    make_module = CsrNMBackend.make_module

    def recording(self: CsrNMBackend, spec: LayerSpec, choice: LayerChoice) -> Any:
        if choice.sparsity == 0.5:
            timed.append(np.array(choice.weight))
        return make_module(self, spec, choice)

    monkeypatch.setattr(CsrNMBackend, "make_module", recording)
    # no dense runtime to compare with: the target is over the dense plan, as the profile predicts it
    # (torch eager and ONNX Runtime run this tiny MLP in 0.3-0.8x the dense plan's time, so a target
    # over them would hang on their ratio; what is tested here is the DP's choice of 2:4)
    from spdy.profilers.dense_runtimes import DenseRuntimes
    monkeypatch.setattr("spdy.api.open_runtimes", lambda *a, **k: DenseRuntimes({}, {}))
    with caplog.at_level(logging.INFO, logger="spdy"):
        # a backend object, as scripts/bench_gpu.py passes its torch-cuda backend with a dtype
        res = spdy.search(tiny_mlp, speedup=target, backend=CsrNMBackend(threads=1, policy=TEST_POLICY), profile=prof,
                          database=db, patterns="2:4", max_evals=6, seed=0, calibrate=False, fit_rounds=0,
                          measure_rounds=1, out=tmp_path / "out")
    L = len(prof.table.layers)
    assert "N:M 2:4 is a choice for 3 of 3 layers" in caplog.text
    assert res.settings["patterns"] == {"2:4": L}
    taken = [n for n, rec in res.layers.items() if rec["pattern"] == "2:4"]
    assert taken, res.layers
    for n in taken:  # in the format the profile timed 2:4 in (csr, or dense where that was faster)
        fmt = prof.pattern_formats[prof.table.layers.index(n)][0]
        assert res.layers[n] == {"sparsity": 0.5, "level": 0, "pattern": "2:4", "format": fmt}
    assert res.dp_target_speedup == pytest.approx(target) and res.predicted_speedup >= target - 1e-9
    assert res.measured_speedup is not None
    # the measured model ran the database's 2:4 weights; the written model holds them
    assert timed and all(nm_violations(w, 2, 4) == 0 for w in timed)
    dense = dict(tiny_mlp.model.named_modules())
    written = spdy.apply(type(tiny_mlp.model)(), tmp_path / "out")
    for n in taken:
        w = dict(written.named_modules())[n].weight.detach().numpy()
        np.testing.assert_array_equal(w, db.weight(n, Choice.nm("2:4")))
        assert nm_violations(w, 2, 4) == 0 and not np.array_equal(w, dense[n].weight.detach().numpy())


def _cpu_profile_where_pruning_pays(bundle: Any) -> tuple[Any, float]:
    """A torch-cpu profile of ``bundle`` with 2:4 timed (no kernel: +inf), its 90 % level made
    0.3 x dense (CSR on a layer this small is no faster than dense), and a target it reaches."""
    prof = profile_model(bundle, get_backend("torch-cpu", threads=1, policy=TEST_POLICY), GRID, patterns="2:4",
                         fit_models=0)
    times = np.array(prof.table.times)
    times[:, 1] = 0.3 * times[:, 0]
    prof = dataclasses.replace(prof, table=dataclasses.replace(prof.table, times=times))
    return prof, 1 + 0.5 * (prof.table.max_speedup() - 1)


def test_search_says_a_pattern_without_a_kernel_is_not_a_choice(tiny_mlp, tmp_path, cache, caplog) -> None:
    prof, target = _cpu_profile_where_pruning_pays(tiny_mlp)
    assert np.all(np.isinf(prof.pattern_times))
    db = build_database(tiny_mlp, tmp_path / "db", GRID, patterns="2:4")
    with caplog.at_level(logging.WARNING):
        res = spdy.search(tiny_mlp, speedup=target, backend="torch-cpu", threads=1, profile=prof, database=db,
                          timing=TEST_POLICY, patterns="2:4", max_evals=4, seed=0, measure=False)
    assert "N:M 2:4 is not a choice in this search: backend torch-cpu has no 2:4 kernel for any layer" in caplog.text
    assert res.settings["patterns"] == {"2:4": 0}
    assert all(rec["pattern"] in ("dense", "unstructured") for rec in res.layers.values())
    plain = spdy.search(tiny_mlp, speedup=target, backend="torch-cpu", threads=1, profile=prof, database=db,
                        timing=TEST_POLICY, max_evals=4, seed=0, measure=False)
    assert plain.layers == res.layers  # the same search as over the grid alone
    evo = spdy.search(tiny_mlp, speedup=target, backend="torch-cpu", threads=1, profile=prof, database=db,
                      timing=TEST_POLICY, patterns="2:4", strategy="evo", max_evals=2, seed=0, measure=False)
    assert evo.settings["patterns"] == {"2:4": 0}  # a strategy over grid levels alone takes such a search too


def test_cli_search_patterns_flag(tmp_path, capsys, cache) -> None:
    from spdy.stages import as_bundle

    prof, target = _cpu_profile_where_pruning_pays(as_bundle("spdy.testing.models:mlp"))
    save_profile(prof, tmp_path / "p.json")
    rc = main(["-q", "search", "--model", "spdy.testing.models:mlp", "--backend", "torch-cpu", "--threads", "1",
               "--profile", str(tmp_path / "p.json"), "--patterns", "2:4", "--speedup", f"{target:.4f}x", "--max-evals", "3",
               "--no-measure", "--no-baselines", "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "N:M 2:4: not a choice on torch-cpu (no layer has a 2:4 kernel there" in out
    db = Database.open(next((tmp_path / "cache" / "databases").iterdir()))
    assert db.patterns == ("2:4",)  # the database built for the search holds the pattern
    rc = main(["-q", "search", "--model", "spdy.testing.models:mlp", "--backend", "torch-cpu", "--threads", "1",
               "--profile", str(tmp_path / "p.json"), "--patterns", "4:8", "--speedup", f"{target:.4f}x",
               "-o", str(tmp_path / "out2")])
    assert rc == 1 and "no times for pattern(s) ['4:8']" in capsys.readouterr().err

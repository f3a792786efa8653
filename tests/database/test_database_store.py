"""The on-disk database: build, resume, verify, stitch, compatibility, encodings, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import spdy.database.store as store
from spdy.cli import main as spdy_main
from spdy.database import Database, build_database
from spdy.database import encoding as enc
from spdy.database.reconstruction import zeros_per_level
from spdy.errors import DatabaseError, InvalidInputError, ProfileMismatchError
from spdy.grid import spdy_grid
from spdy.models.base import ModelBundle, get_module

from .toy_models import make_cnn, make_mlp

GRID = spdy_grid(8)  # 9 levels: quick, and high enough to reach the CSR encoding


@pytest.fixture(scope="module")
def cnn_db(tmp_path_factory) -> tuple[ModelBundle, Path]:
    bundle = make_cnn()
    out = tmp_path_factory.mktemp("db") / "cnn"
    build_database(bundle, out, grid=GRID, progress=False)
    return bundle, out


def test_build_open_and_read(cnn_db) -> None:
    bundle, out = cnn_db
    db = Database.open(out)
    assert db.layers == ("conv1", "conv2", "fc")
    assert db.complete and db.missing == []
    assert db.grid == GRID and db.method == "obs" and db.model == "toy-cnn"
    assert db.errors.shape == (3, len(GRID)) and not db.errors.flags.writeable
    assert np.all(db.errors[:, 0] == 0) and np.all(db.errors[:, 1:] > 0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == store.SCHEMA_VERSION
    assert manifest["calibration_id"] == bundle.calibration_id
    assert manifest["grid"] == GRID.to_json()
    assert [e["spec"]["name"] for e in manifest["layers"]] == list(db.layers)
    assert all(len(e["sha256"]) == 64 for e in manifest["layers"])
    for i, name in enumerate(db.layers):
        dense = get_module(bundle.model, name).weight.detach().numpy()
        np.testing.assert_array_equal(db.weight(name, 0), dense)  # level 0 is the model's own weight
        for lv in range(len(GRID)):
            w = db.weight(i, lv)
            assert w.shape == dense.shape and w.dtype == np.float32 and not w.flags.writeable
            assert int((w == 0).sum()) == zeros_per_level(GRID.as_array(), w.size)[lv]
    assert db.verify() == []
    assert db.total_bytes() < db.dense_bytes()


def test_encodings_follow_storage_cost(cnn_db) -> None:
    _bundle, out = cnn_db
    db = Database.open(out)
    encs = db.encodings("fc")
    assert encs[0] == "dense"
    assert "bitmap" in encs and encs[-1] == "csr"  # 99 % sparse: CSR beats a bitmap


def test_stitch_in_place_and_copy(cnn_db) -> None:
    bundle, out = cnn_db
    db = Database.open(out)
    levels = {"conv1": 3, "conv2": 8, "fc": 5}
    dense = {n: get_module(bundle.model, n).weight.detach().clone() for n in levels}
    copy = db.stitch(bundle.model, levels, inplace=False)
    assert copy is not bundle.model
    for n, lv in levels.items():
        np.testing.assert_array_equal(get_module(copy, n).weight.detach().numpy(), db.weight(n, lv))
        torch.testing.assert_close(get_module(bundle.model, n).weight.detach(), dense[n])  # untouched
    param = get_module(bundle.model, "fc").weight
    same = db.stitch(bundle.model, {"fc": 5})
    assert same is bundle.model and get_module(same, "fc").weight is param  # same Parameter object
    np.testing.assert_array_equal(param.detach().numpy(), db.weight("fc", 5))
    db.stitch(bundle.model, {"fc": 0})  # level 0 restores the dense weight exactly
    torch.testing.assert_close(param.detach(), dense["fc"], rtol=0, atol=0)


def test_stitch_accepts_a_solution(cnn_db) -> None:
    from spdy.types import Solution

    bundle, out = cnn_db
    db = Database.open(out)
    sol = Solution(("conv1", "fc"), np.array([2, 4]), GRID.as_array()[[2, 4]], 1.0, 2.0, 0.0)
    m = db.stitch(bundle.model, sol, inplace=False)
    np.testing.assert_array_equal(get_module(m, "fc").weight.detach().numpy(), db.weight("fc", 4))


def test_stitch_and_weight_refuse_bad_requests(cnn_db) -> None:
    bundle, out = cnn_db
    db = Database.open(out)
    with pytest.raises(InvalidInputError, match="no layer"):
        db.weight("nope", 1)
    with pytest.raises(InvalidInputError, match="out of range"):
        db.weight("fc", len(GRID))
    with pytest.raises(InvalidInputError, match="integer index"):
        db.weight("fc", 0.5)
    other = make_mlp().model
    with pytest.raises(InvalidInputError, match="no layer named"):
        db.stitch(other, {"conv1": 1})


def test_cache_is_bounded_and_reused(cnn_db) -> None:
    _bundle, out = cnn_db
    fc_bytes = 10 * 128 * 4
    db = Database.open(out, cache_bytes=2 * fc_bytes)
    for lv in range(4):
        db.weight("fc", lv)
    info = db.cache_info()
    assert info["entries"] == 2 and info["bytes"] <= 2 * fc_bytes and info["misses"] == 4
    db.weight("fc", 3)
    assert db.cache_info()["hits"] == 1


def test_check_compatible(cnn_db) -> None:
    bundle, out = cnn_db
    db = Database.open(out)
    db.check_compatible(bundle)
    db.check_compatible(bundle, grid=GRID)
    with pytest.raises(ProfileMismatchError, match="grid"):
        db.check_compatible(bundle, grid=spdy_grid(4))
    with pytest.raises(ProfileMismatchError, match="calibration set"):
        db.check_compatible(make_cnn(seed=1))  # same name, other data
    with pytest.raises(ProfileMismatchError, match="model"):
        db.check_compatible(make_mlp())
    changed = make_cnn()
    with torch.no_grad():
        changed.model.conv2.weight[0, 0, 0, 0] += 1.0
    with pytest.raises(ProfileMismatchError, match="other dense weights"):
        db.check_compatible(changed)


def test_killed_build_resumes_at_first_missing_layer(tmp_path, monkeypatch) -> None:
    bundle = make_cnn()
    out = tmp_path / "db"
    calls: list[int] = []
    real = store.reconstruct

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "reconstruct", dying)
    with pytest.raises(KeyboardInterrupt):
        build_database(bundle, out, grid=GRID, progress=False)
    with pytest.raises(DatabaseError, match="incomplete"):
        Database.open(out)
    partial = Database.open(out, require_complete=False)
    assert partial.missing == ["fc"]
    assert any("not built" in p for p in partial.verify())
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert len(before) == 2 and not list(out.glob("*.tmp"))

    calls.clear()
    monkeypatch.setattr(store, "reconstruct", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    db = build_database(bundle, out, grid=GRID, progress=False)
    assert len(calls) == 1  # only the missing layer was recomputed
    assert db.complete and db.verify() == []
    for name, mtime in before.items():
        assert (out / name).stat().st_mtime_ns == mtime  # finished layers untouched

    calls.clear()
    build_database(bundle, out, grid=GRID, progress=False)  # complete: nothing to do
    assert calls == []

    # a damaged layer file is rebuilt by the next build
    victim = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    build_database(bundle, out, grid=GRID, progress=False)
    assert len(calls) == 1 and Database.open(out).verify() == []


def test_resumed_build_equals_a_fresh_one(tmp_path, monkeypatch) -> None:
    bundle = make_mlp()
    fresh = build_database(bundle, tmp_path / "a", grid=GRID, progress=False)
    real = store.reconstruct
    n = []

    def dying(*a, **k):
        n.append(1)
        if len(n) == 2:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(store, "reconstruct", dying)
    with pytest.raises(RuntimeError):
        build_database(bundle, tmp_path / "b", grid=GRID, progress=False)
    monkeypatch.setattr(store, "reconstruct", real)
    resumed = build_database(bundle, tmp_path / "b", grid=GRID, progress=False)
    np.testing.assert_array_equal(fresh.errors, resumed.errors)
    for lv in range(len(GRID)):
        np.testing.assert_array_equal(fresh.weight("fc2", lv), resumed.weight("fc2", lv))


def test_other_setup_in_the_folder_is_refused_unless_overwrite(tmp_path) -> None:
    out = tmp_path / "db"
    build_database(make_mlp(), out, grid=GRID, progress=False)
    with pytest.raises(ProfileMismatchError, match="method"):
        build_database(make_mlp(), out, grid=GRID, method="magnitude", progress=False)
    with pytest.raises(ProfileMismatchError, match="calibration set"):
        build_database(make_mlp(seed=2), out, grid=GRID, progress=False)
    db = build_database(make_mlp(), out, grid=GRID, method="magnitude", progress=False, overwrite=True)
    assert db.method == "magnitude" and db.verify() == []


def test_verify_catches_a_flipped_byte_and_cli_exits_1(tmp_path, capsys) -> None:
    out = tmp_path / "db"
    build_database(make_cnn(), out, grid=GRID, progress=False)
    assert spdy_main(["database", "verify", str(out)]) == 0
    victim = sorted(out.glob("*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    problems = Database.open(out).verify()
    assert len(problems) == 1 and "corrupted" in problems[0] and "conv2" in problems[0]
    capsys.readouterr()
    assert spdy_main(["database", "verify", str(out)]) == 1
    assert "corrupted" in capsys.readouterr().out


def test_verify_catches_missing_file_and_bad_manifest(tmp_path, capsys) -> None:
    out = tmp_path / "db"
    build_database(make_mlp(), out, grid=GRID, progress=False)
    next(out.glob("000-*.safetensors")).unlink()
    problems = Database.open(out).verify()
    assert len(problems) == 1 and "missing" in problems[0]
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DatabaseError, match="not valid JSON"):
        Database.open(out)
    assert spdy_main(["database", "verify", str(out)]) == 1
    assert spdy_main(["database", "verify", str(tmp_path / "nothing")]) == 1


def test_newer_schema_is_refused(tmp_path) -> None:
    out = tmp_path / "db"
    build_database(make_mlp(), out, grid=GRID, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    m["schema_version"] = store.SCHEMA_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatabaseError, match="schema version"):
        Database.open(out)


def test_cli_build_ls_verify(tmp_path, capsys) -> None:
    out = tmp_path / "db"
    spec = "tests.database.toy_models:make_mlp"
    args = ["database", "build", "--model", spec, "-o", str(out), "--grid-levels", "6", "--threads", "1"]
    assert spdy_main(args) == 0
    assert "2 layers x 7 levels" in capsys.readouterr().out
    assert spdy_main(["database", "ls", str(out), "--levels"]) == 0
    text = capsys.readouterr().out
    assert "fc1" in text and "fc2" in text and "dense" in text and "err@" in text
    assert spdy_main(["database", "ls", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["errors"]) == {"fc1", "fc2"} and len(data["errors"]["fc1"]) == 7
    assert spdy_main(["database", "verify", str(out)]) == 0
    # same command again: resumes, nothing to do
    assert spdy_main(args) == 0
    # another method into the same folder: refused with a clear message, exit 1
    assert spdy_main(args + ["--method", "magnitude"]) == 1
    assert "another setup" in capsys.readouterr().err


def test_cli_grid_levels_are_sparsities_and_the_old_count_is_deprecated(tmp_path, capsys, caplog) -> None:
    spec = "tests.database.toy_models:make_mlp"
    base = ["database", "build", "--model", spec, "--threads", "1", "--no-progress"]
    assert spdy_main(base + ["-o", str(tmp_path / "a"), "--grid-levels", "0.5", "0.9"]) == 0
    assert Database.open(tmp_path / "a").grid.levels == (0.0, 0.5, 0.9)
    assert "deprecated" not in caplog.text
    assert spdy_main(base + ["-o", str(tmp_path / "b"), "--grid-levels", "3"]) == 0
    assert len(Database.open(tmp_path / "b").grid) == 4
    assert "--grid-levels 3 as a count of levels is deprecated: pass the sparsities" in caplog.text
    capsys.readouterr()
    assert spdy_main(base + ["-o", str(tmp_path / "c"), "--grid-levels", "0.5", "2"]) == 1
    assert "--grid-levels takes sparsities in [0, 1), such as 0.5 0.7 0.9; got 2" in capsys.readouterr().err


def test_cli_help_has_examples(capsys) -> None:
    for sub in ("build", "verify", "ls"):
        with pytest.raises(SystemExit):
            spdy_main(["database", sub, "--help"])
        assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize("shape,density", [((7, 13), 1.0), ((7, 13), 0.5), ((5, 40), 0.02), ((3, 70000), 0.01)])
def test_encodings_round_trip(shape, density) -> None:
    rng = np.random.default_rng(0)
    W = rng.standard_normal(shape).astype(np.float32)
    keep = rng.random(shape) < density
    keep[0, 0] = True
    W[0, 0] = 0.0  # a kept weight that happens to be 0 stays kept
    Wk = np.where(keep, W, 0).astype(np.float32)
    for e in enc.ENCODINGS:
        if e == "dense" and not keep.all():
            continue
        name, tensors = enc.encode(Wk, keep, "07.", encoding=e)
        out = enc.decode(tensors.__getitem__, name, *shape, "07.")
        np.testing.assert_array_equal(out, Wk)
    assert enc.index_dtype(shape[1]) == (np.uint16 if shape[1] <= 65536 else np.int32)


def test_encoding_choice_by_storage_cost() -> None:
    rows, cols = 384, 1536
    L = rows * cols
    assert enc.choose_encoding(rows, cols, L) == "dense"
    assert enc.choose_encoding(rows, cols, int(0.6 * L)) == "bitmap"
    assert enc.choose_encoding(rows, cols, int(0.1 * L)) == "bitmap"
    assert enc.choose_encoding(rows, cols, int(0.05 * L)) == "csr"  # crossover at density 1/16
    # the lecture-notes formula: bitmap (1-p) L n + L bits
    assert enc.storage_bits("bitmap", rows, cols, int(0.4 * L)) == int(0.4 * L) * 32 + L


def test_damaged_arrays_raise_database_error() -> None:
    W = np.eye(4, dtype=np.float32)
    keep = W != 0
    _name, t = enc.encode(W, keep, "", encoding="bitmap")
    t["values"] = t["values"][:-1]
    with pytest.raises(DatabaseError):
        enc.decode(t.__getitem__, "bitmap", 4, 4, "")

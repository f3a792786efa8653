"""N:M (2:4, 4:8) reconstruction and its storage next to the unstructured levels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import spdy.database.store as store
from spdy.choices import Choice, parse_pattern
from spdy.cli import main as spdy_main
from spdy.database import Database, build_database
from spdy.database.hessian import capture_hessians
from spdy.database.reconstruction import (
    inverse_factor,
    magnitude_nm,
    obs,
    obs_nm,
    reconstruct,
    relative_errors,
)
from spdy.errors import DatabaseError, InvalidInputError
from spdy.grid import spdy_grid
from spdy.models.base import ModelBundle, get_module

from .toy_models import make_mlp, structured_inputs

GRID = spdy_grid(6)
PATTERNS = ("2:4", "4:8")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The CLI's --threads and torch backends set torch's thread count process-wide: put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def layer_problem(d: int = 64, out: int = 40, n: int = 512, seed: int = 0, dead: int | None = 5):
    """A weight and the Hessian of real, correlated inputs (one dead input)."""
    X = structured_inputs(n, d, seed, rank=6)
    if dead is not None:
        X[:, dead] = 0.0
    g = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(out, d, generator=g)
    H = X.T.double() @ X.double()
    return W, H, X


def kept_per_group(pruned: torch.Tensor, m: int) -> torch.Tensor:
    out, d = pruned.shape
    return (~pruned).reshape(out, d // m, m).sum(-1)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_every_row_group_keeps_exactly_n_of_m(pattern: str) -> None:
    nm = parse_pattern(pattern)
    W, H, _ = layer_problem()
    for weights, pruned in (obs_nm(W, H, pattern, blocksize=24)[:2], magnitude_nm(W, pattern)):
        assert torch.all(kept_per_group(pruned, nm.m) == nm.n)
        assert torch.all(weights[pruned] == 0)
        assert torch.all(weights[~pruned] != 0)  # real data: no kept weight lands on exactly 0
        assert weights.dtype == torch.float32 and torch.isfinite(weights).all()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_obs_nm_beats_magnitude_nm_on_correlated_inputs(pattern: str) -> None:
    W, H, X = layer_problem()
    w_obs, _, e_obs = obs_nm(W, H, pattern)
    w_mag, _ = magnitude_nm(W, pattern)
    e_mag = float(relative_errors(W, w_mag.unsqueeze(0), H)[0])
    assert e_obs < 0.6 * e_mag
    # the sweep's own error is the true relative output error on the calibration inputs
    Y = X @ W.T
    e_true = float(((Y - X @ w_obs.T).square().sum() / Y.square().sum()))
    assert e_obs == pytest.approx(e_true, rel=1e-3)


def test_obs_nm_prunes_dead_inputs_first_and_reuses_the_factor() -> None:
    W, H, _ = layer_problem(dead=5)
    factor = inverse_factor(H, 0.01)
    w1, p1, e1 = obs_nm(W, H, "2:4", factor=factor)
    w2, p2, e2 = obs_nm(W, H, "2:4")  # computes the same factor itself
    assert torch.equal(w1, w2) and torch.equal(p1, p2) and e1 == e2
    assert p1[:, 5].all()  # the dead input is always among the pruned
    # the unstructured sweep with the shared factor is unchanged
    a = obs(W, H, GRID.as_array(), factor=factor)
    b = obs(W, H, GRID.as_array())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[2], b[2])


def test_exact_nm_refits_obs_masks_and_is_never_worse() -> None:
    W, H, _ = layer_problem()
    sp = GRID.as_array()
    r_obs = reconstruct("obs", W, H, sp, patterns=PATTERNS)
    r_exact = reconstruct("exact", W, H, sp, patterns=PATTERNS)
    r_mag = reconstruct("magnitude", W, H, sp, patterns=PATTERNS)
    for k, pattern in enumerate(PATTERNS):
        m = parse_pattern(pattern).m
        assert torch.equal(r_exact.pattern_pruned[k], r_obs.pattern_pruned[k])  # same masks
        assert r_exact.pattern_errors[k] <= r_obs.pattern_errors[k] * (1 + 1e-6)
        assert r_obs.pattern_errors[k] < r_mag.pattern_errors[k]
        for r in (r_obs, r_exact, r_mag):
            assert torch.all(kept_per_group(r.pattern_pruned[k], m) == parse_pattern(pattern).n)
    np.testing.assert_array_equal(r_obs.errors, reconstruct("obs", W, H, sp).errors)  # levels unaffected


def test_layer_whose_inputs_are_not_a_multiple_of_m_is_skipped_not_an_error() -> None:
    W, H, _ = layer_problem(d=36)  # 36 = 9 groups of 4, not a multiple of 8
    rec = reconstruct("obs", W, H, GRID.as_array(), patterns=PATTERNS)
    assert rec.pattern_weights[0] is not None and rec.pattern_skipped[0] is None
    assert rec.pattern_weights[1] is None and rec.pattern_errors[1] is None
    assert "not a multiple of 8" in rec.pattern_skipped[1]
    with pytest.raises(InvalidInputError, match="not a multiple of 8"):
        obs_nm(W, H, "4:8")


class ConvNet(nn.Module):
    """Convs whose flattened inputs (in*kh*kw = 8*3*3 = 72) hold 2:4 and 4:8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)  # 27 inputs: no N:M
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)  # 72 inputs
        self.fc = nn.Linear(16 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


def make_convnet(seed: int = 0) -> ModelBundle:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    base = torch.randn(24, 1, 6, 6, generator=g)
    base = nn.functional.avg_pool2d(nn.functional.pad(base, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.cat([base, 0.5 * base + 0.2 * torch.randn_like(base), torch.randn(24, 1, 6, 6, generator=g)], 1)
    return ModelBundle("toy-convnet", ConvNet(), list(x.split(8)))


def test_conv2d_flattened_input_nm_reduces_the_real_conv_output_error() -> None:
    bundle = make_convnet()
    spec = next(s for s in bundle.layers() if s.name == "conv2")
    H = capture_hessians(bundle, [spec], progress=False)[spec.name].H
    conv = bundle.model.conv2
    W = conv.weight.detach().reshape(16, -1)
    w_obs, p_obs, e_obs = obs_nm(W, H, "2:4")
    w_mag, _ = magnitude_nm(W, "2:4")
    assert torch.all(kept_per_group(p_obs, 4) == 2)
    # the error on the real conv outputs (not only the H-based number) drops against magnitude
    inputs = []
    hook = bundle.model.conv2.register_forward_hook(lambda _m, i, _o: inputs.append(i[0]))
    with torch.no_grad():
        for b in bundle.calibration:
            bundle.model(b)
    hook.remove()
    x = torch.cat(inputs)

    @torch.no_grad()
    def out_err(w: torch.Tensor) -> float:
        y0 = nn.functional.conv2d(x, conv.weight, None, padding=1)
        y = nn.functional.conv2d(x, w.reshape(conv.weight.shape), None, padding=1)
        return float((y - y0).square().sum() / y0.square().sum())

    assert out_err(w_obs) < 0.8 * out_err(w_mag)
    assert e_obs == pytest.approx(out_err(w_obs), rel=1e-2)


# ------------------------------------------------------------------------------ the store


@pytest.fixture(scope="module")
def nm_db(tmp_path_factory) -> tuple[ModelBundle, Path]:
    bundle = make_convnet()
    out = tmp_path_factory.mktemp("db") / "convnet"
    build_database(bundle, out, grid=GRID, progress=False, patterns="2:4,4:8")
    return bundle, out


def test_patterns_are_stored_with_the_levels(nm_db) -> None:
    bundle, out = nm_db
    db = Database.open(out)
    assert db.patterns == PATTERNS
    assert db.pattern_errors.shape == (3, 2) and not db.pattern_errors.flags.writeable
    assert np.all(np.isnan(db.pattern_errors[0])) and np.all(db.pattern_errors[1:] > 0)
    assert not db.has_pattern("conv1", "2:4") and db.has_pattern("conv2", "2:4") and db.has_pattern("fc", "4:8")
    assert db.pattern_skipped("2:4") == {"conv1": "input size 27 is not a multiple of 4"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["patterns"] == ["2:4", "4:8"]
    rec = manifest["layers"][1]["patterns"]["2:4"]
    assert rec["nnz"] == 16 * 72 // 2 and rec["error"] == pytest.approx(db.pattern_errors[1, 0])
    assert manifest["layers"][0]["patterns"]["4:8"] == {"skipped": "input size 27 is not a multiple of 8"}
    assert len(list(out.glob("*.safetensors"))) == 3  # one file per layer, patterns inside
    for name in ("conv2", "fc"):
        for pattern in PATTERNS:
            nm = parse_pattern(pattern)
            w = db.weight(name, 0, pattern=pattern)
            assert w.shape == get_module(bundle.model, name).weight.shape and not w.flags.writeable
            groups = (w.reshape(w.shape[0], -1) != 0).reshape(w.shape[0], -1, nm.m).sum(-1)
            assert np.all(groups == nm.n)
            np.testing.assert_array_equal(db.weight(name, Choice.nm(pattern)), w)
    assert db.verify() == []


def test_stitch_takes_choices(nm_db) -> None:
    bundle, out = nm_db
    db = Database.open(out)
    plan = {"conv1": Choice.unstructured(db.grid, 3), "conv2": Choice.nm("2:4"), "fc": Choice.dense()}
    model = db.stitch(bundle.model, plan, inplace=False)
    np.testing.assert_array_equal(model.conv1.weight.detach().numpy(), db.weight("conv1", 3))
    np.testing.assert_array_equal(model.conv2.weight.detach().numpy(), db.weight("conv2", 0, pattern="2:4"))
    np.testing.assert_array_equal(model.fc.weight.detach().numpy(), bundle.model.fc.weight.detach().numpy())
    mixed = db.stitch(bundle.model, {"conv1": 2, "fc": Choice.nm("4:8")}, inplace=False)  # ints still work
    np.testing.assert_array_equal(mixed.conv1.weight.detach().numpy(), db.weight("conv1", 2))


def test_pattern_requests_that_cannot_be_met_say_why(nm_db) -> None:
    _bundle, out = nm_db
    db = Database.open(out)
    with pytest.raises(InvalidInputError, match="conv1.*no 2:4 choice: input size 27"):
        db.weight("conv1", 0, pattern="2:4")
    with pytest.raises(InvalidInputError, match="no 1:4 reconstructions.*--patterns 1:4"):
        db.weight("fc", 0, pattern="1:4")
    with pytest.raises(InvalidInputError, match="one level, 0"):
        db.weight("fc", 2, pattern="2:4")
    with pytest.raises(InvalidInputError, match="like '2:4'"):
        db.weight("fc", 0, pattern="two-four")
    with pytest.raises(InvalidInputError, match="no 2:4 choice"):
        db.stitch(make_convnet().model, {"conv1": Choice.nm("2:4")})


def test_build_with_patterns_resumes_after_a_kill(tmp_path, monkeypatch) -> None:
    bundle = make_mlp()
    out = tmp_path / "db"
    calls: list[dict] = []
    real = store.reconstruct

    def dying(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "reconstruct", dying)
    with pytest.raises(KeyboardInterrupt):
        build_database(bundle, out, grid=GRID, progress=False, patterns=PATTERNS)
    partial = Database.open(out, require_complete=False)
    assert partial.missing == ["fc2"] and partial.patterns == PATTERNS
    assert partial.has_pattern("fc1", "2:4") and not partial.has_pattern("fc2", "2:4")
    calls.clear()
    monkeypatch.setattr(store, "reconstruct", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    db = build_database(bundle, out, grid=GRID, progress=False, patterns=PATTERNS)
    assert len(calls) == 1 and calls[0]["patterns"] == PATTERNS
    assert db.complete and db.verify() == []
    fresh = build_database(bundle, tmp_path / "fresh", grid=GRID, progress=False, patterns=PATTERNS)
    np.testing.assert_array_equal(fresh.pattern_errors, db.pattern_errors)
    np.testing.assert_array_equal(fresh.weight("fc2", 0, pattern="2:4"), db.weight("fc2", 0, pattern="2:4"))
    # fc1 has 12 inputs: 2:4 yes, 4:8 no (recorded)
    assert db.pattern_skipped("4:8") == {"fc1": "input size 12 is not a multiple of 8"}
    calls.clear()
    build_database(bundle, out, grid=GRID, progress=False)  # without patterns: keeps them, nothing to do
    assert calls == [] and Database.open(out).patterns == PATTERNS


def test_old_database_opens_and_gains_patterns_on_request(tmp_path, monkeypatch) -> None:
    bundle = make_mlp()
    out = tmp_path / "db"
    old = build_database(bundle, out, grid=GRID, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "patterns" not in manifest and all("patterns" not in e for e in manifest["layers"])
    assert old.patterns == () and old.pattern_errors.shape == (2, 0) and old.verify() == []
    assert not old.has_pattern("fc2", "2:4")
    with pytest.raises(InvalidInputError, match="no 2:4 reconstructions"):
        old.weight("fc2", 0, pattern="2:4")
    levels_before = [old.weight("fc2", lv).copy() for lv in range(len(GRID))]
    db = build_database(bundle, out, grid=GRID, progress=False, patterns="2:4")
    assert db.patterns == ("2:4",) and db.has_pattern("fc1", "2:4") and db.verify() == []
    for lv, w in enumerate(levels_before):
        np.testing.assert_array_equal(db.weight("fc2", lv), w)


def test_verify_catches_a_broken_nm_group(tmp_path) -> None:
    out = tmp_path / "db"
    build_database(make_mlp(), out, grid=GRID, progress=False, patterns="2:4")
    # rewrite fc2's file with one 2:4 group keeping 3 weights, and make the checksums agree
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["layers"][1]
    from safetensors.numpy import load_file, save_file

    path = out / entry["file"]
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    enc_name = entry["patterns"]["2:4"]["encoding"]
    assert enc_name == "bitmap"
    keep = np.unpackbits(tensors["nm2_4.bitmap"], count=16 * 24).astype(bool)
    first_pruned = int(np.flatnonzero(~keep[:4])[0])
    keep[first_pruned] = True
    values = tensors["nm2_4.values"]
    tensors["nm2_4.bitmap"] = np.packbits(keep)
    tensors["nm2_4.values"] = np.insert(values, first_pruned, np.float32(0.5))
    save_file(tensors, str(path), metadata=meta)
    data = path.read_bytes()
    import hashlib

    entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = Database.open(out).verify()
    assert problems == ["layer fc2 pattern 2:4: 1 row-groups do not keep exactly 2 of 4"]


def test_cli_build_with_patterns_ls_verify(tmp_path, capsys) -> None:
    out = tmp_path / "db"
    spec = "tests.database.toy_models:make_mlp"
    args = ["database", "build", "--model", spec, "-o", str(out), "--grid-levels", "4", "--threads", "1",
            "--patterns", "2:4,4:8", "--no-progress"]
    assert spdy_main(args) == 0
    text = capsys.readouterr().out
    assert "pattern 2:4: 2 layers" in text and "pattern 4:8: 1 layers; 1 skipped (first: fc1" in text
    assert spdy_main(["database", "ls", str(out)]) == 0
    assert "err@2:4" in capsys.readouterr().out
    assert spdy_main(["database", "ls", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["patterns"] == ["2:4", "4:8"] and data["pattern_errors"]["fc1"]["4:8"] is None
    assert spdy_main(["database", "verify", str(out)]) == 0
    assert spdy_main(["database", "build", "--model", spec, "-o", str(tmp_path / "x"), "--patterns", "2-4"]) == 1
    assert "like '2:4'" in capsys.readouterr().err


def test_damaged_pattern_entry_is_a_database_error(tmp_path) -> None:
    out = tmp_path / "db"
    build_database(make_mlp(), out, grid=GRID, progress=False, patterns="2:4")
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["layers"][1]["patterns"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    db = Database.open(out)
    assert not db.has_pattern("fc2", "2:4")
    with pytest.raises(DatabaseError, match="no 2:4 entry"):
        db.weight("fc2", 0, pattern="2:4")
    assert any("pattern 2:4 not built" in p for p in db.verify())


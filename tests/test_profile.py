"""Profiles: N:M pattern times on disk, and the DP's table over a profile's levels and patterns."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from spdy.choices import Choice
from spdy.errors import InvalidInputError
from spdy.profile import Profile, choice_table, load_profile, save_profile
from tests.pattern_profiles import make_profile


def test_choice_table_from_a_profile() -> None:
    prof = make_profile()
    t = choice_table(prof)
    S = len(prof.table.grid)
    assert t.choices[0] == Choice.dense() and t.choices[S:] == (Choice.nm("2:4"), Choice.nm("4:8"))
    assert t.times.shape == (3, S + 2) and not t.times.flags.writeable
    np.testing.assert_array_equal(t.times[:, :S], prof.table.times)
    assert t.available[:, S].tolist() == [False, True, True]  # layer 0: no 2:4 kernel
    assert not t.available[:, S + 1].any()  # 4:8: no kernel anywhere
    assert t.formats[1][S] == "2:4" and t.formats[0][S] == "" and t.formats[1][2] == "csr"
    assert t.dense_total_s == pytest.approx(prof.table.dense_total_s)
    assert t.patterns() == ("2:4", "4:8")
    only = choice_table(prof, patterns="2:4", unstructured=False)
    assert only.choices == (Choice.dense(), Choice.nm("2:4")) and only.times.shape == (3, 2)
    with pytest.raises(InvalidInputError, match="no times for pattern.*1:4.*--patterns"):
        choice_table(prof, patterns=["1:4"])
    plain = choice_table(make_profile(patterns=()))
    assert plain.patterns() == () and plain.times.shape == (3, S)


def test_choice_table_only_offers_what_the_database_holds(caplog) -> None:
    prof = make_profile()
    db = SimpleNamespace(layers=prof.table.layers, patterns=("2:4",),
                         has_pattern=lambda i, p: p == "2:4" and i != 2)  # layer 2: input not a multiple of 4
    t = choice_table(prof, database=db)
    assert t.patterns() == ("2:4",)  # 4:8 is not in the database: left out, with a warning
    assert "no 4:8 reconstructions" in caplog.text
    S = len(prof.table.grid)
    assert t.available[:, S].tolist() == [False, True, False]


def test_profile_with_pattern_times_round_trips(tmp_path) -> None:
    prof = make_profile()
    path = tmp_path / "p.json"
    save_profile(prof, path)
    data = json.loads(path.read_text())
    assert data["patterns"] == ["2:4", "4:8"]
    assert data["layers"][0]["patterns"] == {}  # no kernel: nothing recorded (no inf in JSON)
    assert data["layers"][1]["patterns"]["2:4"]["format"] == "2:4"
    back = load_profile(path)
    assert back.patterns == ("2:4", "4:8")
    np.testing.assert_array_equal(back.pattern_times, prof.pattern_times)
    assert back.pattern_formats == prof.pattern_formats
    np.testing.assert_array_equal(choice_table(back).times, choice_table(prof).times)
    # with_validation keeps the patterns
    assert back.with_validation([{"predicted_s": 1.0, "measured_s": 1.0}]).patterns == back.patterns


def test_profiles_without_patterns_still_load(tmp_path) -> None:
    prof = make_profile(patterns=())
    data = prof.to_json()
    assert "patterns" not in data and all("patterns" not in rec for rec in data["layers"])
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    back = load_profile(path)
    assert back.patterns == () and back.pattern_times is None
    bad = make_profile().to_json()
    bad["layers"][1]["patterns"]["1:4"] = {"time_s": 1.0}
    path.write_text(json.dumps(bad))
    with pytest.raises(InvalidInputError, match="1:4"):
        load_profile(path)
    with pytest.raises(InvalidInputError, match="pattern_times has shape"):
        Profile(prof.table, patterns=("2:4",), pattern_times=np.zeros((2, 1)))
    with pytest.raises(InvalidInputError, match=r"\+inf"):
        Profile(prof.table, patterns=("2:4",), pattern_times=np.full((3, 1), np.nan))


def test_the_profiles_formats_are_its_tables() -> None:
    prof = make_profile(patterns=())
    assert prof.table.formats == prof.formats and prof.table.formats[0][2] == "csr"
    sol = prof.table.solution([0, 1, 2])
    assert sol.formats == ("dense", "dense", "csr")
    assert choice_table(prof) is prof.table  # no patterns: the profile's own table


def test_a_profile_with_planned_layers_round_trips(tmp_path) -> None:
    from spdy.grid import spdy_grid
    from spdy.types import FusedPair, LatencyTable, PlannedLayer

    names = ("q", "k", "v", "o", "up", "down")
    formats = tuple(("dense", "csr", "bcsr4x1") for _ in names)
    table = LatencyTable(names, spdy_grid(2), np.array([[10.0, 4.0, 3.0]] * 6), 1.0, formats=formats,
                         fused=(FusedPair(4, 5, 5.0),), planned=(PlannedLayer((0, 1, 2, 3, 4, 5), 2.0),))
    path = tmp_path / "p.json"
    save_profile(Profile(table, formats=formats), path)
    assert json.loads(path.read_text())["planned_layers"] == [{"members": list(names), "share_s": 2.0}]
    back = load_profile(path).table
    assert back.planned == table.planned and back.fused == table.fused
    for lv in ([1] * 6, [0, 1, 1, 1, 1, 1], [2, 2, 2, 1, 0, 0]):
        assert back.predicted_time(lv) == pytest.approx(table.predicted_time(lv))
    assert choice_table(load_profile(path)).planned == table.planned

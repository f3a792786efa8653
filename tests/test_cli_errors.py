"""The CLI's one error boundary (spdy.cli.main): an expected error is one line on stderr
that says what was given, what was expected and what to do next, and exit status 1;
a traceback only with --debug."""

from __future__ import annotations

from pathlib import Path

import pytest

from spdy import dp
from spdy.cli import main
from spdy.errors import InvalidInputError, ModelLoadError

#: The one wording of a bad speedup target, wherever it is given.
BAD_SPEEDUP = "speedup must be a number greater than 1, such as 1.5x or 2; got {!r} (1x is the dense model)"


@pytest.fixture
def timings(tmp_path: Path) -> Path:
    """Two layers in SPDY's reference text format (dense, 50% and 90% sparse)."""
    lines = ["base", "0.010", "prunable", "0.008"]
    for name, dense in (("l0", 0.005), ("l1", 0.003)):
        lines += [name, f"{dense:.6f} 0.0", f"{dense * 0.5:.6f} 0.5", f"{dense * 0.2:.6f} 0.9"]
    p = tmp_path / "timings.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def test_solve_with_malformed_errors_json(timings: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "errors.json"
    bad.write_text('{"l0": [0, 1, 2], "l1": [0, 1,')
    assert main(["solve", "--timings", str(timings), "--speedup", "1.5x", "--errors", str(bad)]) == 1
    err = _one_line_error(capsys)
    assert f"errors file {str(bad)!r} is not valid JSON" in err  # what was given
    assert "line 1, column" in err
    assert 'expected {"layer name": [one score per level], ...} or a text matrix' in err  # what was expected
    assert "fix the file or pass another --errors" in err  # what to do next


def test_solve_with_errors_json_of_the_wrong_shape(timings: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "errors.json"
    bad.write_text('{"errors": [1, 2, 3]}')
    assert main(["solve", "--timings", str(timings), "--speedup", "1.5x", "--errors", str(bad)]) == 1
    assert "holds list under 'errors'; expected {\"layer name\"" in _one_line_error(capsys)
    bad.write_text('{"l0": [0, 1, 2], "l1": [0, [1]]}')
    assert main(["solve", "--timings", str(timings), "--speedup", "1.5x", "--errors", str(bad)]) == 1
    assert "not one number per level for every layer" in _one_line_error(capsys)


def test_solve_with_valid_errors_json_still_works(timings: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    ok = tmp_path / "errors.json"
    ok.write_text('{"l0": [0, 1, 2], "l1": [0, 1, 2]}')
    assert main(["solve", "--timings", str(timings), "--speedup", "1.5x", "--errors", str(ok), "--json"]) == 0
    assert '"predicted_speedup"' in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["::", ":factory", "pkg.mod:", "a b:c"])
def test_search_with_a_malformed_model_spec(spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--model", spec, "--speedup", "2x", "-o", str(tmp_path / "out")]) == 1
    err = _one_line_error(capsys)
    assert err == (
        f"error: model {spec!r} is not of the form 'package.module:factory' (a module path, one colon, a function "
        "name); pass a built-in name (minilm) or e.g. spdy.examples.digits:factory"
    )


def test_malformed_model_spec_from_the_library() -> None:
    from spdy.models.base import load_model

    with pytest.raises(ModelLoadError, match="not of the form 'package.module:factory'"):
        load_model("::")


@pytest.mark.parametrize("bad", ["1x", "0.5", "abc", "nan", "-2"])
def test_bad_speedup_has_one_wording_in_every_command(bad: str, timings: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    want = "error: " + BAD_SPEEDUP.format(bad)
    assert main(["solve", "--timings", str(timings), "--speedup", bad]) == 1
    assert _one_line_error(capsys) == want
    assert main(["search", "--model", "minilm", "--speedup", bad, "-o", str(tmp_path / "out")]) == 1
    assert _one_line_error(capsys) == want


def test_bad_speedup_has_one_wording_in_the_library(timings: Path) -> None:
    """dp.parse_speedup is the one check; the DP, the search config and spdy.search all use it."""
    import spdy
    from spdy.profile import load_profile
    from spdy.sensitivity import SearchConfig

    table = load_profile(timings).table
    want = BAD_SPEEDUP.format(1.0)
    calls = [
        lambda: dp.parse_speedup(1.0),
        lambda: dp.solve(table, dp.prior_errors(2, 3), 1.0),
        lambda: SearchConfig(speedup=1.0),
        lambda: spdy.search("minilm", speedup=1.0),
    ]
    for call in calls:
        with pytest.raises(InvalidInputError) as info:
            call()
        assert str(info.value) == want


def test_debug_shows_the_traceback(timings: Path) -> None:
    with pytest.raises(InvalidInputError):
        main(["--debug", "solve", "--timings", str(timings), "--speedup", "1x"])


def test_unreadable_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    # a folder where a timings file is expected: reading it raises IsADirectoryError (an OSError)
    assert main(["solve", "--timings", str(folder), "--speedup", "2x"]) == 1
    err = _one_line_error(capsys)
    assert str(folder) in err and "check the path" in err


def test_cut_off_reference_timings_are_refused(timings: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.txt"
    lines = timings.read_text().splitlines()
    cut.write_text("\n".join(lines[:-4]) + "\n")  # cut off after layer l0
    assert main(["solve", "--timings", str(cut), "--speedup", "1.5x"]) == 1
    err = _one_line_error(capsys)
    assert "the dense times of the 1 layers listed add up to 0.005 s, but 'prunable' says 0.008 s" in err
    assert "the file is cut off or lacks layers" in err and "Copy the complete file again" in err


def test_published_reference_timings_still_load(reference_dir: Path) -> None:
    from spdy.profile import read_reference_timings

    for path in sorted(reference_dir.glob("*.txt")):
        t = read_reference_timings(path).table
        assert len(t.layers) >= 21 and len(t.grid) == 42 and t.base_s > 0, path.name


def test_search_with_an_unreachable_storage_fails_before_any_work(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("psycopg")
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://spdy:secret@127.0.0.1:{port}/spdy"
    assert main(["search", "--model", "spdy.testing.models:mlp", "--speedup", "1.5x", "--storage", url,
                 "--profile", str(tmp_path / "p.json"), "-o", str(tmp_path / "out")]) == 1
    err = _one_line_error(capsys)
    assert f"cannot open the storage 'postgresql://spdy:***@127.0.0.1:{port}/spdy'" in err
    assert "check that the server runs" in err
    assert not (tmp_path / "p.json").exists()  # failed before the profile was measured


def test_search_with_a_storage_whose_driver_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a))
    assert main(["search", "--model", "spdy.testing.models:mlp", "--speedup", "1.5x", "--storage",
                 "postgresql://db.example/spdy", "-o", str(tmp_path / "out")]) == 1
    assert _one_line_error(capsys) == ("error: storage 'postgresql://db.example/spdy' needs the database driver "
                                       "'psycopg', which is not installed: pip install 'spdy[postgres]'")

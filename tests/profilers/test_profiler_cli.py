"""``spdy profile``: the command end to end on a tiny model (torch-cpu, 3 levels, quick timing)."""

from __future__ import annotations

import json

import pytest

from spdy.cli import main

MODEL = "spdy.testing.models:mlp"


def _profile(tmp_path, *extra):
    out = tmp_path / "p.json"
    rc = main(["-q", "profile", "--model", MODEL, "--backend", "torch-cpu", "--threads", "1",
               "--grid-levels", "0.5", "0.9", "--quick", "-o", str(out), *extra])
    return rc, out


def test_profile_writes_a_validated_profile(tmp_path, capsys):
    rc, out = _profile(tmp_path, "--validate", "2")
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["schema"] == "spdy.profile" and d["backend"] == "torch-cpu" and d["grid"] == [0.0, 0.5, 0.9]
    assert len(d["layers"]) == 3 and len(d["validation"]) == 2
    assert all(len(rec["times_s"]) == 3 and len(rec["formats"]) == 3 for rec in d["layers"])
    assert d["settings"]["threads"] == 1 and d["fingerprint"]["threads"] == 1
    text = capsys.readouterr().out
    assert "median |predicted - measured| / measured" in text and "wrote" in text
    # each validated model's speedup over the dense model in torch eager and in ONNX Runtime, same round
    for rec in d["validation"]:
        for rt in ("torch", "onnxruntime"):
            assert rec[f"speedup_over_{rt}"] == pytest.approx(rec[f"{rt}_dense_s"] / rec["measured_s"])
    assert "vs torch eager" in text and "vs ONNX Runtime" in text and "dense model in the same round" in text
    assert "dense plan now" in text and "in the profile" in text


def test_from_revalidates_and_refuses_other_hardware_unless_forced(tmp_path, capsys):
    rc, out = _profile(tmp_path)
    assert rc == 0
    d = json.loads(out.read_text())
    d["fingerprint"]["cpu_model"] = "some other CPU"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    args = ["-q", "profile", "--model", MODEL, "--backend", "torch-cpu", "--threads", "1", "--quick",
            "--from", str(other), "--validate", "1", "-o", str(tmp_path / "v.json")]
    assert main(args) == 1
    assert "other hardware" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert len(json.loads((tmp_path / "v.json").read_text())["validation"]) == 1


def test_unknown_backend_is_one_clear_line(tmp_path, capsys):
    rc = main(["profile", "--model", MODEL, "--backend", "tpu", "-o", str(tmp_path / "x.json")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "unknown latency backend 'tpu'" in err and "Traceback" not in err


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    assert "spdy profile --model minilm --backend spdy-cpu" in capsys.readouterr().out


def test_validation_says_when_the_dense_plan_moved_into_another_state():
    from spdy.profilers.cli import dense_drift_line

    assert dense_drift_line(None, 0.016) == "" and dense_drift_line(0.016, None) == ""
    quiet = dense_drift_line(0.01596, 0.01595)
    assert quiet.startswith("dense plan now 15.96 ms vs 15.95 ms in the profile (+0.1%)") and "state read" not in quiet
    moved = dense_drift_line(0.01876, 0.01595)
    assert "(+17.6%)" in moved and "another state" in moved and "state read is the one that applies" in moved
    assert "another state" in dense_drift_line(0.0135, 0.01595)  # faster by more than 10% too


def test_validation_names_onnx_runtimes_gain_from_its_threads_where_it_ran_on_one_too(tmp_path, capsys):
    from spdy.profile import Profile
    from spdy.profilers.cli import _print_validation

    rc, out = _profile(tmp_path, "--validate", "1")
    assert rc == 0
    d = json.loads(out.read_text())
    rec = d["validation"][-1]
    rec["onnxruntime_1t_dense_s"] = 1.4 * rec["onnxruntime_dense_s"]  # as a 2-thread run's probe would read
    capsys.readouterr()
    _print_validation(Profile.from_json(d))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("dense model in the same round"))
    assert line.endswith("(its gain from 1 threads: 1.40x)") and "ONNX Runtime on 1 thread" in line

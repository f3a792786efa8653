"""scripts/bench_deployed.py: block timing and the --result argument."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_deployed import blocks, main, scaling_by_state  # noqa: E402


def test_blocks_time_every_fn_once_per_round_in_rotating_order(monkeypatch):
    import bench_deployed

    monkeypatch.setattr(bench_deployed, "PAUSE_S", 0.0)
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    out = blocks(fns, rounds=3, calls=2)
    assert set(out) == {"a", "b", "c"} and all(len(v) == 3 and min(v) >= 0 for v in out.values())
    # per round, per fn, one untimed call and two timed
    firsts = [calls[i * 9] for i in range(3)]
    assert firsts == ["a", "b", "c"]
    calls.clear()
    blocks(fns, rounds=1, calls=2, start=4)  # one round at a time, rotating as round 4 does
    assert calls[0] == "b"


def test_the_second_threads_gain_is_given_per_state_read_from_onnx_runtime():
    # rounds 1 and 3: ONNX Runtime gains 1.45x from its second thread (slow state), the others 1.85x
    ort1 = [34.0] * 6
    ort2 = [34 / 1.85, 34 / 1.45, 34 / 1.85, 34 / 1.45, 34 / 1.85, 34 / 1.85]
    model1 = [10.0] * 6
    model2 = [10 / 1.8, 10 / 1.3, 10 / 1.8, 10 / 1.3, 10 / 1.8, 10 / 1.8]
    times = {1: {"ONNX Runtime": ort1, "m": model1}, 2: {"ONNX Runtime": ort2, "m": model2}}
    states, by_state = scaling_by_state(times, 1, 2, gap=0.15)
    assert states == [1, 0, 1, 0, 1, 1]
    assert by_state["fast"]["rounds"] == 4 and by_state["slow"]["rounds"] == 2
    assert by_state["fast"]["m"] == pytest.approx(1.8) and by_state["slow"]["m"] == pytest.approx(1.3)
    assert by_state["fast"]["ONNX Runtime"] == pytest.approx(1.85)
    # one state: no gap
    times[2]["ONNX Runtime"] = [34 / 1.85] * 6
    states, by_state = scaling_by_state(times, 1, 2, gap=0.15)
    assert set(by_state) == {"fast"} and by_state["fast"]["rounds"] == 6


def test_a_result_that_is_not_a_search_folder_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--result", f"2x={tmp_path}"])
    assert "spdy search output folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--result", "no-label"])


@pytest.mark.parametrize("fmt, fused", [("dnnl", 0), ("bcsr4x1", 6)])
def test_dense_plan_computes_the_dense_model_with_every_layer_in_its_format(fmt, fused):
    # bcsr4x1 (spdy's blocked kernel on the full weights) also runs every feed-forward fused
    pytest.importorskip("transformers")
    import torch

    from bench_deployed import dense_plan
    from spdy import runtime
    from spdy.models.base import load_model
    from spdy.models.minilm import load_encoder

    try:
        bundle = load_model("minilm", n_calibration=1)
    except Exception as exc:  # the model package is optional
        pytest.skip(f"MiniLM unavailable: {exc}")
    names = [s.name for s in bundle.layers()]
    plan = dense_plan(load_encoder()[0], names, fmt)
    assert runtime.layer_formats(plan) == {n: fmt for n in names}
    calls = []
    from spdy.kernels import _spmm

    # the fused feed-forward from rows (ffn_into, a partly fused layer) or on the tile layout (a
    # layer whose parts all fuse): count both kernels, run them
    real = {n: getattr(_spmm, n) for n in ("ffn_forward", "ffn_tiles")}
    for n, f in real.items():
        setattr(_spmm, n, lambda *a, f=f: calls.append(1) or f(*a))
    try:
        with torch.inference_mode():
            got = bundle.forward(plan, bundle.example)
    finally:
        for n, f in real.items():
            setattr(_spmm, n, f)
    assert len(calls) == fused
    with torch.inference_mode():
        torch.testing.assert_close(got, bundle.forward(bundle.model, bundle.example), atol=2e-5, rtol=1e-4)

"""The shared timing discipline, with a fake clock: stopping rules, races, contention, passes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from spdy.errors import BackendUnavailableError, InvalidInputError
from spdy.profilers import DENSE, LayerChoice, Timing, TimingPolicy, available_backends, get_backend
from spdy.profilers.base import Backend
from spdy.profilers.pruning import LevelPruner, magnitude_prune, prune_n_m, random_level_vectors
from spdy.types import LayerSpec


class FakeRunner:
    """A runner whose 'time' comes from a sequence (cycled)."""

    def __init__(self, times):
        self.times = list(times)
        self.calls = 0

    def __call__(self):
        self.calls += 1


class FakeMonitor:
    """Other processes are busy (``busy``) or not; time is real."""

    def __init__(self, busy=False):
        self.available = True
        self.busy = busy

    def snapshot(self):
        import time

        return (0.0, 0.0, time.perf_counter())

    def others_share(self, start, end=None):
        return 1.0 if self.busy else 0.0

    def others_busy(self, window_s=0.0):
        return 1.0 if self.busy else 0.0


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, policy, layer_times=None):
        super().__init__(threads=1, policy=policy)
        self.layer_times = layer_times or {}

    def _sample(self, fn, inner):
        fn()
        return fn.times[(fn.calls - 1) % len(fn.times)]

    def layer_formats(self, spec, sparsity):
        return (DENSE, "sparse") if sparsity > 0 else (DENSE,)

    def layer_runner(self, spec, choice, x=None):
        return FakeRunner(self.layer_times[(choice.fmt, round(choice.sparsity, 3))])

    def model_runner(self, bundle, choices):
        return FakeRunner([1.0])


POLICY = TimingPolicy(warmup_calls=1, min_repeats=10, max_repeats=50, target_ci=0.02, max_seconds=1e9,
                      min_samples=3, min_sample_s=0.0, race_after=5, passes=1, max_others=math.inf)


def test_steady_runner_stops_at_min_repeats():
    be = FakeBackend(POLICY)
    r = FakeRunner([1e-3])
    (t,) = be.measure([r])
    assert t.n == POLICY.min_repeats and t.median_s == pytest.approx(1e-3) and t.spread == 0


def test_noisy_runner_runs_to_max_repeats_and_reports_spread():
    be = FakeBackend(POLICY)
    r = FakeRunner([1e-3, 2e-3, 3e-3, 1.5e-3])
    (t,) = be.measure([r])
    assert t.n == POLICY.max_repeats and t.spread > 0.3
    assert t.median_s == pytest.approx(np.median([1e-3, 2e-3, 3e-3, 1.5e-3]), rel=0.3)


def test_models_are_timed_in_lockstep():
    # alone, the steady runner would stop at min_repeats while the noisy one samples on into a later minute
    steady, noisy = FakeRunner([1e-3]), FakeRunner([1e-3, 2e-3, 3e-3, 1.5e-3])
    a, b = FakeBackend(POLICY).measure([steady, noisy])
    assert (a.n, b.n) == (POLICY.min_repeats, POLICY.max_repeats)
    steady, noisy = FakeRunner([1e-3]), FakeRunner([1e-3, 2e-3, 3e-3, 1.5e-3])
    a, b = FakeBackend(dataclasses.replace(POLICY, lockstep=True)).measure([steady, noisy])
    assert a.n == b.n == POLICY.max_repeats and steady.calls == noisy.calls
    assert TimingPolicy().for_models().lockstep and not TimingPolicy().lockstep


class _Cache:
    """The runner that ran last: a stand-in for the caches it left."""

    last: str = ""


class _AfterRunner:
    """One call takes ``t``, or ``t * slower`` right after ``evictor`` ran (it left the caches full of its own data)."""

    def __init__(self, name, cache, t, evictor="", slower=1.0):
        self.name, self.cache, self.t, self.evictor, self.slower = name, cache, t, evictor, slower
        self.calls, self.times, self.after = 0, [t], []

    def __call__(self):
        self.after.append(self.cache.last)
        self.times = [self.t * (self.slower if self.cache.last == self.evictor else 1.0)]
        self.calls += 1
        self.cache.last = self.name


def test_shuffled_rounds_keep_a_predecessor_from_slowing_one_runner_every_round():
    def run(shuffle):
        cache = _Cache()
        runners = [_AfterRunner("dense", cache, 1e-3, evictor="torch", slower=1.5),
                   *(_AfterRunner(f"m{i}", cache, 1e-3) for i in range(4)), _AfterRunner("torch", cache, 2e-3)]
        policy = dataclasses.replace(POLICY, lockstep=True, shuffle=shuffle, min_repeats=20, max_repeats=20)
        return runners, FakeBackend(policy).measure(runners)

    runners, timings = run(False)
    assert set(runners[0].after[1:]) == {"torch"} and timings[0].median_s == pytest.approx(1.5e-3)
    runners, timings = run(True)
    # every round still times each runner once; the dense model now follows torch in a few rounds only
    assert all(r.calls == runners[0].calls for r in runners)
    assert 0 < runners[0].after.count("torch") < len(runners[0].after) / 2
    assert timings[0].median_s == pytest.approx(1e-3)
    assert TimingPolicy().for_models().shuffle and not TimingPolicy().shuffle


def test_a_block_turn_times_a_model_in_its_own_caches_as_a_loop_of_it_runs():
    def run(block):
        cache = _Cache()
        runners = [_AfterRunner("dense", cache, 1e-3, evictor="torch", slower=1.5), _AfterRunner("torch", cache, 2e-3)]
        policy = dataclasses.replace(POLICY, lockstep=True, min_repeats=20, max_repeats=20, block_calls=block)
        return runners, FakeBackend(policy).measure(runners)

    runners, timings = run(1)  # call by call: the dense model always runs right after torch
    assert timings[0].median_s == pytest.approx(1.5e-3)
    runners, timings = run(4)
    # each turn: one untimed call (after torch, slow) and four timed ones after itself
    assert timings[0].median_s == pytest.approx(1e-3) and timings[0].n == 20
    assert runners[0].after.count("torch") == 20 // 4 and runners[0].calls == runners[1].calls
    assert TimingPolicy().for_models(blocks=True).block_calls == TimingPolicy().model_block_calls > 1
    assert TimingPolicy().block_calls == TimingPolicy().for_models().block_calls == 1
    with pytest.raises(InvalidInputError, match="block_calls"):
        TimingPolicy(block_calls=0)


def test_time_cap_stops_slow_runners():
    be = FakeBackend(dataclasses.replace(POLICY, max_seconds=0.5))
    (t,) = be.measure([FakeRunner([0.1, 0.2])])
    assert t.n == POLICY.min_samples  # 3 samples reach the 0.5 s cap


def test_runners_are_interleaved_round_by_round():
    order = []

    class Rec(FakeRunner):
        def __call__(self):
            super().__call__()
            order.append(self)

    be = FakeBackend(dataclasses.replace(POLICY, warmup_calls=0, min_repeats=3, max_repeats=3))
    a, b = Rec([1e-3]), Rec([2e-3])
    be.measure([a, b])
    timed = order[2:]  # after one warm-up call each
    assert timed == [a, b] * 3


def test_a_clear_loser_is_dropped_early():
    be = FakeBackend(POLICY)
    fast, slow = FakeRunner([1e-3, 1.2e-3]), FakeRunner([5e-3, 6e-3])
    t_fast, t_slow = be.measure([fast, slow], rivals=[[1], [0]])
    assert t_slow.dropped and t_slow.n == POLICY.race_after
    assert not t_fast.dropped and t_fast.n > t_slow.n


def test_disturbed_samples_are_discarded_until_patience_runs_out():
    be = FakeBackend(dataclasses.replace(POLICY, max_others=0.1, window_s=0.0, patience_s=1e-12, busy_sleep_s=0.0))
    be._monitor = FakeMonitor(busy=True)
    (t,) = be.measure([FakeRunner([1e-3])])
    # every sample looked disturbed; after the patience ran out they were kept anyway
    assert t.discarded >= 1 and t.n == POLICY.min_repeats
    assert be.stats["busy_giveups"] == 1 and be.stats["discarded"] == t.discarded


def test_a_busy_spell_is_discarded_then_waited_out():
    class Spell(FakeMonitor):
        def __init__(self):
            super().__init__(busy=True)
            self.judged = 0

        def others_share(self, start, end=None):
            self.judged += 1
            return 1.0 if self.judged == 1 else 0.0  # only the first window is disturbed

        def others_busy(self, window_s=0.0):
            return 0.0

    be = FakeBackend(dataclasses.replace(POLICY, max_others=0.1, window_s=0.0, busy_sleep_s=0.0))
    be._monitor = Spell()
    (t,) = be.measure([FakeRunner([1e-3])])
    assert t.discarded == 1 and t.n == POLICY.min_repeats and be.stats["busy_giveups"] == 0


def test_quiet_machine_discards_nothing():
    be = FakeBackend(dataclasses.replace(POLICY, max_others=0.1, window_s=0.0))
    be._monitor = FakeMonitor()
    (t,) = be.measure([FakeRunner([1e-3])])
    assert t.discarded == 0 and be.stats["discarded"] == 0


def test_policy_is_validated():
    with pytest.raises(InvalidInputError):
        TimingPolicy(min_repeats=3, max_repeats=2)
    with pytest.raises(InvalidInputError):
        TimingPolicy(race_ratio=0.5)
    assert TimingPolicy().for_models().min_repeats >= 25


def test_registry_refuses_unknown_and_unavailable_backends():
    with pytest.raises(BackendUnavailableError, match="unknown latency backend 'nope'.*spdy-cpu"):
        get_backend("nope")
    for name, reason in available_backends().items():
        if reason:
            with pytest.raises(BackendUnavailableError, match="cannot run here"):
                get_backend(name)


def test_torch_cuda_without_cuda_says_what_to_install():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    reason = available_backends()["torch-cuda"]
    assert reason and ("CUDA" in reason or "GPU" in reason)


def test_threads_must_be_positive():
    with pytest.raises(InvalidInputError, match="threads must be >= 1"):
        get_backend("torch-cpu", threads=0)


# --------------------------------------------------------------------- pruning helpers


def test_magnitude_prune_zeroes_the_smallest_exactly():
    w = np.arange(1, 101, dtype=np.float32).reshape(10, 10) * np.where(np.arange(100) % 2, 1, -1).reshape(10, 10)
    p = magnitude_prune(w, 0.3)
    assert (p == 0).sum() == 30 and np.all(np.abs(w[p == 0]) <= 30)
    assert (magnitude_prune(w, 0.0) == w).all() and (magnitude_prune(w, 1.0) == 0).all()


def test_level_pruner_is_nested_and_exact():
    w = np.random.default_rng(0).standard_normal((16, 24)).astype(np.float32)
    pr = LevelPruner(w)
    prev = None
    for s in (0.0, 0.4, 0.7, 0.99):
        p = pr.at(s)
        assert (p == 0).sum() == round(s * w.size)
        if prev is not None:
            assert np.all((prev == 0) <= (p == 0))  # zeros only grow
        prev = p
    assert pr.at(0.0) is pr.weight


def test_two_four_pruning_is_valid_at_and_above_half():
    w = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    for s in (0.5, 0.8):
        p = prune_n_m(w, s, 2, 4)
        assert (np.count_nonzero(p.reshape(8, -1, 4), axis=-1) <= 2).all()
        assert (p == 0).sum() >= round(s * w.size)


def test_random_level_vectors_are_seeded_and_in_range():
    a = random_level_vectors(36, 42, 5, seed=3)
    assert a.shape == (5, 36) and a.min() >= 0 and a.max() < 42
    assert (a == random_level_vectors(36, 42, 5, seed=3)).all()


def _timing(s: float) -> Timing:
    return Timing(median_s=s, spread=0.01, ci=0.01, n=10, inner=1)


def test_a_serial_format_within_the_preference_is_kept_with_its_own_time():
    from spdy.kernels.linear import SERIAL
    from spdy.profilers.base import SERIAL_PREFERENCE, SERIAL_SUFFIX, _fastest, format_rank

    assert SERIAL_SUFFIX == SERIAL  # the kernels' name for the formats that run on the calling thread
    close = {DENSE: _timing(2e-4), "csr": _timing(1.00e-4), "csr-1t": _timing(1.00e-4 * (1 + SERIAL_PREFERENCE / 2))}
    got = _fastest(0.9, close)
    assert got.fmt == "csr-1t" and got.time_s == pytest.approx(close["csr-1t"].median_s)  # not the discounted time
    far = {**close, "csr-1t": _timing(1.00e-4 * (1 + 2 * SERIAL_PREFERENCE))}
    assert _fastest(0.9, far).fmt == "csr"
    # dense wins a tie with any sparse format; without a serial one the fastest wins
    assert min([("csr", 1e-4), (DENSE, 1e-4)], key=lambda kv: format_rank(*kv))[0] == DENSE
    assert min([("bcsr1x4", 0.9e-4), ("csr", 1e-4)], key=lambda kv: format_rank(*kv))[0] == "bcsr1x4"


def test_a_picked_format_is_timed_by_passes_that_did_not_pick_it():
    from spdy.profilers.profiler import _Group, _candidate_times, _pick

    rng = np.random.default_rng(0)
    # two formats of the same true speed (0.5 of dense), each pass reading +-20%: the fastest
    # median of the two is biased low, the cross-fitted time is not
    biased, crossed = [], []
    for _ in range(300):
        g = _Group("g", [0])
        g.ratios = [{DENSE: [(1.0, 0.0)] * 12},
                    {f: [(0.5 * rng.uniform(0.8, 1.2), 0.0) for _ in range(12)] for f in ("csr", "bcsr4x1")}]
        cands = _candidate_times([g], np.array([1.0]), 1)[0][1]
        fmt, t, _spread = _pick(cands, None)
        assert fmt == min(cands, key=lambda f: cands[f][0])  # deployed: the fastest over all passes
        biased.append(cands[fmt][0])
        crossed.append(t)
        assert _pick(_candidate_times([g], np.array([1.0]), 1)[0][0], None) == ("dense", 1.0, 0.0)
    assert np.mean(biased) < 0.49 < np.mean(crossed) < 0.51


def test_groups_take_an_equal_share_of_their_saving_off_each_layer_where_its_format_fuses():
    from spdy.profilers.profiler import _credit_groups

    times = np.full((4, 3), 30e-6)
    formats = [("bcsr4x1", "csr", "csr"), ("dense", "csr", "csr"), ("csr", "csr", "dnnl"), ("csr", "csr", "csr")]
    _credit_groups(times, formats, [(0, 1, 2)], 30e-6)
    want = np.array([[20e-6, 20e-6, 20e-6], [30e-6, 20e-6, 20e-6], [20e-6, 20e-6, 30e-6], [30e-6, 30e-6, 30e-6]])
    np.testing.assert_allclose(times, want, rtol=0, atol=1e-12)  # the fourth layer is in no triple
    _credit_groups(times, formats, [(0, 1, 2)], 0.0)  # nothing saved: nothing taken off
    np.testing.assert_allclose(times, want, rtol=0, atol=1e-12)
    _credit_groups(times, formats, [(3,)], 5e-6)  # a one-layer group: all of its saving, at every fusing level
    np.testing.assert_allclose(times[3], [25e-6, 25e-6, 25e-6], rtol=0, atol=1e-12)
    _credit_groups(times, formats, [(0, 1, 2)], 1.0)  # never below zero
    assert times.min() == 0.0


def test_stored_values_count_whole_blocks_and_every_value_of_a_dense_format():
    from types import SimpleNamespace

    from spdy.profilers.profiler import _Stored, stored_values

    w = np.zeros((8, 8), dtype=np.float32)
    w[0, 0] = 1.0  # one nonzero: one 4x1 block (rows 0-3, column 0), one 1x4 block (row 0, columns 0-3)
    w[5, 6] = w[6, 6] = 2.0  # two nonzeros in one 4x1 block (rows 4-7, column 6), two 1x4 blocks
    assert stored_values(w, "csr") == 3
    assert stored_values(w, "bcsr4x1") == 8 and stored_values(w, "bcsr1x4") == 12
    odd = np.ones((6, 5), dtype=np.float32)  # partial blocks count whole
    assert stored_values(odd, "bcsr4x1") == 8 * 5 and stored_values(odd, "bcsr1x4") == 6 * 8
    rng = np.random.default_rng(0)
    big = rng.standard_normal((384, 384)).astype(np.float32)
    spec = SimpleNamespace(kind="linear")
    stored = _Stored([(spec, big, None, None)], [0.0, 0.4, 0.95], ())
    # unstructured 40%: almost every 4-wide block keeps a nonzero (1 - 0.4**4), so the blocked
    # format reads ~97% of the weight where csr reads 60%; the dense formats read it all
    assert stored(0, 1, "csr") == pytest.approx(0.6 * big.size / 1e6, rel=1e-3)
    assert stored(0, 1, "bcsr4x1") == pytest.approx((1 - 0.4 ** 4) * big.size / 1e6, rel=0.01)
    assert stored(0, 1, "bcsr4x1-1t") == stored(0, 1, "bcsr4x1")
    assert stored(0, 2, "dense") == stored(0, 2, "dnnl") == big.size / 1e6
    assert stored(0, 2, "bcsr1x4") == pytest.approx((1 - 0.95 ** 4) * big.size / 1e6, rel=0.05)


def _probe_setup():
    """Four layers in two shape groups, three grid levels; loop times per (entry, format)."""
    from spdy.profilers.profiler import _Group

    specs = [LayerSpec(f"l{i}", "linear", (8, 8) if i % 2 == 0 else (16, 8), (1, 4, 8), True) for i in range(4)]
    groups = [_Group("a", [0, 2]), _Group("b", [1, 3])]
    for g in groups:  # ratios to dense: bcsr4x1 fastest in the loop, csr within the race ratio, dnnl only at 0
        g.ratios = [{DENSE: [(1.0, 0.0)], "dnnl": [(0.95, 0.0)], "bcsr4x1": [(0.9, 0.0)]},
                    {DENSE: [(1.0, 0.0)], "bcsr4x1": [(0.6, 0.0)], "csr": [(0.7, 0.0)]},
                    {DENSE: [(1.0, 0.0)], "bcsr4x1": [(0.3, 0.0)], "csr": [(0.2, 0.0)]}]
    return specs, groups


def test_format_probes_run_half_of_each_shape_group_among_background_layers():
    from spdy.profilers.profiler import _probes

    specs, groups = _probe_setup()
    be = get_backend("spdy-cpu", threads=1)
    probes = _probes(be, groups, specs, [0.0, 0.5, 0.8])
    bg = probes[0]
    assert bg.fmt is None and bg.entries == (2, 2, 2, 2) and bg.formats == ("csr",) * 4  # fastest at 0.8
    by = {(p.entry, p.fmt): p for p in probes[1:]}
    # the unpruned model in every competitive format, dense ones included; dense reads only there
    assert {k for k in by if k[0] == 0} == {(0, DENSE), (0, "dnnl"), (0, "bcsr4x1")}
    assert (1, DENSE) not in by and {(1, "bcsr4x1"), (1, "csr")} <= set(by)
    assert (2, "csr") not in by  # it would be the background itself: that one time measures it
    p = by[0, "dnnl"]
    # one layer of each shape group probed, the other one among the background
    assert p.entries == (0, 0, 2, 2) and p.formats == ("dnnl", "dnnl", "csr", "csr")


def test_format_factors_recover_what_the_model_adds_to_the_loop():
    from spdy.profilers.profiler import _Probe, _format_factors, _scaled

    loop = {0: {DENSE: 100e-6, "bcsr4x1": 90e-6}, 1: {DENSE: 100e-6, "bcsr4x1": 60e-6, "csr": 70e-6},
            2: {DENSE: 100e-6, "csr": 20e-6, "bcsr4x1": 30e-6}}
    cands = [[{f: (t, 0.0) for f, t in loop[e].items()} for e in range(3)] for _ in range(4)]
    true = {(2, "csr"): 1.2, (0, "bcsr4x1"): 1.5, (1, "bcsr4x1"): 1.4, (1, "csr"): 1.0, (0, DENSE): 2.0}
    base = 1e-3
    probes = [_Probe(2, None, (2,) * 4, ("csr",) * 4)]
    probes += [_Probe(e, f, (e, e, 2, 2), (f, f, "csr", "csr")) for (e, f) in true if (e, f) != (2, "csr")]

    def model_time(p):
        return base + sum(loop[e][f] * true[e, f] for e, f in zip(p.entries, p.formats))

    timings = [Timing(model_time(p), 0.0, 0.0, 10, 1) for p in probes]
    factors, records = _format_factors(probes, timings, base, cands, 3)
    assert records[0]["format"] is None and records[0]["factor"] == pytest.approx(1.2)
    assert factors["bcsr4x1"] == pytest.approx([1.5, 1.4, 1.4])  # the last probe holds beyond it
    # the background, in one format, measures that format at its level
    assert factors["csr"] == pytest.approx([1.0, 1.0, 1.2]) and factors[DENSE] == pytest.approx([2.0] * 3)
    cands[0][2]["dnnl"] = (50e-6, 0.0, (40e-6, 60e-6))  # never probed: the largest factor at its entry
    scaled = _scaled(cands, factors, 3)
    assert scaled[0][1]["bcsr4x1"][0] == pytest.approx(60e-6 * 1.4)
    assert scaled[0][2]["dnnl"][0] == pytest.approx(50e-6 * 2.0) and scaled[0][2]["dnnl"][2] == pytest.approx((80e-6, 120e-6))
    assert cands[0][1]["bcsr4x1"][0] == 60e-6  # the loop times themselves are left alone


def test_a_format_that_does_not_fuse_must_beat_one_that_does_by_the_whole_saving():
    from spdy.profilers.profiler import _pick

    cands = {"dnnl": (100e-6, 0.0), "bcsr4x1": (160e-6, 0.0)}
    assert _pick(cands, None, credit=50e-6)[0] == "dnnl"  # 160 - 50 > 100
    assert _pick(cands, None, credit=70e-6)[0] == "bcsr4x1"
    assert _pick(cands, None, credit=70e-6)[1] == 160e-6  # the credit picks; the time stays the format's own


def test_unfused_runner_turns_every_fusion_off():
    import torch
    from conftest import tiny_bert_bundle

    from spdy.runtime import EncoderForward

    bundle = tiny_bert_bundle()
    model = bundle.model
    be = get_backend("spdy-cpu", threads=1)
    plan = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("encoder."):
            w = m.weight.detach().numpy()
            plan[name] = LayerChoice("csr", LevelPruner(w).at(0.5), m.bias.detach().numpy(), 0.5)

    def switches(run):
        fwds = [m.__dict__["forward"] for _n, m in run.model.named_modules()
                if isinstance(m.__dict__.get("forward"), EncoderForward)]
        assert fwds, "the encoder runs on spdy's forward"
        return {(f.fuse_ffn, f.fuse_qkv, f.fuse_out) for f in fwds}

    fused, alone = be.model_runner(bundle, plan), be.unfused_runner(bundle, plan)
    assert switches(fused) == {(True, True, True)} and switches(alone) == {(False, False, False)}
    np.testing.assert_allclose(np.asarray(fused()), np.asarray(alone()), rtol=1e-3, atol=1e-4)


def test_a_pruned_level_run_dense_costs_what_the_unpruned_one_does():
    """A dense kernel's time does not depend on the zeros: a pruned level whose fastest format is
    dense is timed as the unpruned level (its own timings, lower by noise, would let the DP buy
    error for nothing); sparse formats keep their own times."""
    from spdy.profilers.profiler import _table_arrays

    stored = lambda li, e, f: 0.0  # noqa: E731
    cands = [[{DENSE: (100e-6, 0.0), "dnnl": (90e-6, 0.0)},
              {DENSE: (97e-6, 0.0), "dnnl": (85e-6, 0.0), "csr": (120e-6, 0.0)},
              {"dnnl": (88e-6, 0.0), "csr": (70e-6, 0.0)}]]
    times, _spread, formats = _table_arrays(cands, None, stored)
    assert formats == [("dnnl", "dnnl", "csr")]
    assert times[0].tolist() == pytest.approx([90e-6, 90e-6, 70e-6])
    assert cands[0][1]["dnnl"][0] == 85e-6  # the measurements themselves are left alone


import re

import numpy as np

from lossguard.records import Columns, Reason, Sample
from lossguard.signals.plateau import PlateauDetector
from lossguard.testing.synthetic import make_curve


def _feed(det, samples):
    return [f for s in samples if (f := det.update(s)) is not None]


def _premature(total=2000, onset=500, seed=0, every=1):
    rng = np.random.default_rng(seed)
    t = np.arange(1, total + 1)
    y = 0.5 + 2.0 * (1 + t / 50) ** -0.6
    y[onset:] = y[onset]
    y = y * (1 + 0.03 * rng.standard_normal(total))
    return [Sample(step=int(s), loss=float(v), lr=1e-4) for s, v in zip(t[every - 1::every], y[every - 1::every])]


def test_premature_plateau_is_found_soon_after_its_onset():
    found = _feed(PlateauDetector(max_steps=2000), _premature())
    assert len(found) == 1
    f = found[0]
    assert f.reason == Reason.EARLY_CONVERGENCE
    assert 500 < f.step <= 700 and 400 <= f.onset_step <= 600
    assert "of 2000 steps" in f.message and f"onset {f.onset_step}" in f.message


def test_plateau_found_in_a_sparse_log():
    # every 20th raw value, noise not averaged: 25-30 values after the onset carry the evidence
    # (the plain decay fits this curve closely enough to take 880 steps to beat)
    found = _feed(PlateauDetector(max_steps=2000), _premature(every=20))
    assert len(found) == 1 and 500 < found[0].step <= 900


def test_no_finding_without_knowing_the_run_length():
    assert _feed(PlateauDetector(), _premature()) == []


def test_no_finding_late_in_the_run():
    assert _feed(PlateauDetector(max_steps=1100), _premature(total=1100, onset=700)) == []


def test_healthy_shapes_do_not_fire():
    for kind in ("exp", "slow", "staircase", "warmup", "power"):
        for seed in range(3):
            curve = make_curve(kind, 10 + seed, heavy_tails=False)
            det = PlateauDetector(max_steps=curve.max_steps)
            assert _feed(det, curve.samples) == [], (kind, seed)


def test_a_run_that_never_got_going_stalls():
    rng = np.random.default_rng(0)
    samples = [Sample(step=i, loss=float(2.94 * (1 + 0.01 * rng.standard_normal())), lr=0.03 * (1 - i / 400))
               for i in range(1, 401)]
    found = _feed(PlateauDetector(max_steps=400), samples)
    assert len(found) == 1 and found[0].evidence["rule"] == "stall" and found[0].step <= 200
    # one reading: what it did, what a slow healthy decay would have done, the noise allowed for
    assert re.search(r"; it (fell only|rose) \S+ in the \d+ steps since step \d+, where even a slow healthy decay "
                     r"would have fallen \S+ \(noise of \S+ per value allowed for\); onset \d+\.$", found[0].message)


def test_a_run_flat_through_a_long_warmup_stalls_before_the_warmup_ends():
    rng = np.random.default_rng(1)
    warm = 300
    samples = [Sample(step=i, loss=float(2.5 * (1 + 0.02 * rng.standard_normal())),
                      lr=1e-3 * min(i / warm, 1.0)) for i in range(1, 3001)]
    found = _feed(PlateauDetector(max_steps=3000), samples)
    assert len(found) == 1 and found[0].evidence["rule"] == "stall" and found[0].step < warm


def test_a_stall_after_a_few_wild_first_steps_is_still_a_stall():
    # the shape of the tiny model at lr 3e-2: a spike at step 3 and ten steps near 3.1 before it
    # settles at 2.93 for good; those first steps must not pass for a fall
    rng = np.random.default_rng(1)
    level = [4.1 if i == 3 else 3.15 if i <= 10 else 2.93 for i in range(1, 401)]
    samples = [Sample(step=i, loss=float(v + 0.07 * rng.standard_normal()), lr=0.03 * (1 - i / 600))
               for i, v in enumerate(level, start=1)]
    found = _feed(PlateauDetector(max_steps=600), samples)
    assert len(found) == 1 and found[0].evidence["rule"] == "stall"
    assert found[0].step <= 160 and 5 <= found[0].onset_step <= 40


def test_a_clean_linear_decline_is_not_a_stall_but_a_clean_flat_line_is():
    """Noise-free logs (averaged or synthetic) must not let the spike clipping flatten a trend."""
    from lossguard.signals.suite import DetectorSuite

    falling, flat = DetectorSuite(max_steps=400), DetectorSuite(max_steps=400)
    found_falling, found_flat = [], []
    for i in range(1, 201):
        found_falling += falling.observe(Sample(step=i, loss=3.0 - i / 100, grad_norm=1.0, lr=1e-3))
        found_flat += flat.observe(Sample(step=i, loss=2.9, grad_norm=1.0, lr=1e-3))
    assert found_falling == []
    assert [f.reason.value for f in found_flat] == ["early_convergence"]


def test_batch_bookkeeping_after_the_early_part_equals_streaming():
    # past early_fraction the batch path only keeps books, vectorised; an LR restart, a NaN
    # loss, missing LRs and epochs there must leave exactly the streaming state
    n = 4000
    rng = np.random.default_rng(1)
    steps = np.arange(1, n + 1)
    loss = 0.8 + 2.0 * (1 + steps / 100.0) ** -0.5 * (1 + 0.03 * rng.standard_normal(n))
    loss[3100] = np.nan
    lr = 2e-4 * (1 - steps / n)
    lr[3000:3200] *= 3.0  # a restart, then a fall
    lr[2500] = np.nan
    ep = steps / 1000.0
    ep[3900:] = np.nan
    batch = PlateauDetector(max_steps=n)
    batch.update_many(Columns.of(steps, loss, None, lr, ep))
    stream = PlateauDetector(max_steps=n)
    for i in range(n):
        stream.update(Sample(step=int(steps[i]), loss=float(loss[i]),
                             lr=None if np.isnan(lr[i]) else float(lr[i]),
                             epoch=None if np.isnan(ep[i]) else float(ep[i])))
    assert batch.state_dict() == stream.state_dict()
    assert batch.seg_start == 3001 and batch.lr_fell and batch.last_step == n


def test_resting_after_a_far_from_firing_check_cuts_the_fits_and_delays_a_finding_at_most_one_check(monkeypatch):
    import lossguard.signals.plateau as plateau

    calls = []
    real_fit = plateau.fit_kink

    def counted(*args, **kwargs):
        calls.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(plateau, "fit_kink", counted)

    def run(curve, rest: bool) -> tuple[list[tuple[int, int]], int]:
        calls.clear()
        det = PlateauDetector(max_steps=curve.max_steps)
        found = []
        for s in curve.samples:
            f = det.update(s)
            if not rest:
                det.kink_rest = False
            if f is not None:
                found.append((f.step, f.onset_step))
        return found, len(calls)

    healthy = make_curve("power", 11, max_steps=2000)
    (h_rest, n_rest), (h_all, n_all) = run(healthy, True), run(healthy, False)
    assert h_rest == h_all == [] and n_all > 50 and n_rest < 0.7 * n_all
    delays = []
    for seed in range(3, 9):  # a decay that turns flat (healthy since the label revision; a shape all the same)
        curve = make_curve("decay_flat", seed, max_steps=2000)
        (found, _), (expected, _) = run(curve, True), run(curve, False)
        assert len(found) == len(expected) == 1 and found[0][0] >= curve.flat_from
        delays.append(found[0][0] - expected[0][0])
    assert all(d in (0, 10) for d in delays) and delays.count(0) >= 4, delays  # one check is 10 steps here


def test_step_bins_push_many_equals_push_to_the_last_bit():
    from lossguard.signals.stats import StepBins

    rng = np.random.default_rng(4)
    for trial in range(60):
        n = int(rng.integers(1, 2000))
        steps = np.cumsum(rng.integers(0, 4, n)) + int(rng.integers(0, 50))
        values = rng.standard_normal(n) * 10 ** rng.uniform(-3, 3) + rng.uniform(-5, 5)
        one = StepBins(int(rng.choice([4, 8, 64])))
        pre = int(rng.integers(0, n))
        for s, v in zip(steps[:pre].tolist(), values[:pre].tolist()):
            one.push(s, v)
        many = StepBins(one.max_bins)
        many.load_state_dict(one.state_dict())
        for s, v in zip(steps[pre:].tolist(), values[pre:].tolist()):
            one.push(s, v)
        cuts = sorted({pre, n, *rng.integers(pre, n + 1, 3).tolist()})
        for a, b in zip(cuts[:-1], cuts[1:]):
            many.push_many(steps[a:b], values[a:b])
        assert many.state_dict() == one.state_dict(), trial


def test_batch_path_equals_streaming_over_long_stretches_between_checks():
    # 20k steps: checks hundreds of steps apart late in the early part, so the batch path keeps
    # the books a stretch at a time; a warmup, a restart (after which the slow decay is reported
    # as a stall), NaN losses, missing LRs and epochs, a plateau that resolves, cut into three batches
    n = 20_000
    rng = np.random.default_rng(2)
    steps = np.arange(1, n + 1)
    curve = 0.6 + 2.0 * (1 + steps / 300.0) ** -0.5
    curve[6000:9000] = curve[6000]
    curve[9000:] = 0.6 + 2.0 * (1 + (steps[9000:] - 3000) / 300.0) ** -0.5
    loss = curve * (1 + 0.03 * rng.standard_normal(n))
    loss[rng.integers(0, n, 40)] = np.nan
    lr = np.minimum(steps / 500, 1.0) * 2e-4 * (1 - steps / n)
    lr[3000:3400] *= 2.0
    lr[rng.integers(0, n, 40)] = np.nan
    ep = steps / 4000.0
    ep[rng.integers(0, n, 40)] = np.nan
    stream = PlateauDetector(max_steps=n)
    expected = []
    for i in range(n):
        f = stream.update(Sample(step=int(steps[i]), loss=float(loss[i]),
                                 lr=None if np.isnan(lr[i]) else float(lr[i]),
                                 epoch=None if np.isnan(ep[i]) else float(ep[i])))
        if f is not None:
            expected.append((i, f.step, f.onset_step, f.message))
    batch = PlateauDetector(max_steps=n)
    got = []
    for a, b in ((0, 700), (700, 7777), (7777, n)):
        got += [(a + i, f.step, f.onset_step, f.message)
                for i, f in batch.update_many(Columns.of(steps[a:b], loss[a:b], None, lr[a:b], ep[a:b]))]
    assert got == expected and len(expected) >= 1
    assert batch.state_dict() == stream.state_dict()

"""Each peer rule against what its source does, on hand-made series.

The expected steps come from reading the sources (named in each rule's docstring), worked by
hand: which value fires, which does not, and the edge each source has.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lossguard.records import Reason
from lossguard.testing import peers
from lossguard.testing.peers import (
    DlibDivergence,
    DlibPlateau,
    HFEarlyStopping,
    KillLossSpike,
    LightningEarlyStopping,
    MegatronChecks,
    OLMoSkipStep,
    OLMoStabilityMonitor,
    TorchReduceLROnPlateau,
    count_steps_without_decrease,
    probability_values_are_increasing,
    replay,
)


def _run(rule, losses, grad_norms=None):
    steps = list(range(1, len(losses) + 1))
    return replay(rule, steps, losses, grad_norms)


def _steps(alarms):
    return [a.step for a in alarms]


# transformers EarlyStoppingCallback ------------------------------------------------------------

def test_hf_early_stopping_default_patience_stops_at_the_first_value_that_is_no_new_best():
    alarms = _run(HFEarlyStopping(), [3.0, 2.0, 2.5, 1.0])
    assert _steps(alarms) == [3] and alarms[0].stops and alarms[0].reasons == {Reason.EARLY_CONVERGENCE}


def test_hf_early_stopping_best_moves_on_any_improvement_but_patience_resets_only_past_the_threshold():
    # 2.8 beats 3.0 by 0.2 <= 0.5: the counter goes up, yet the Trainer makes 2.8 the best, so
    # 2.7 (0.1 better than 2.8) is measured against 2.8 and counts again: stop at the 3rd value
    assert _steps(_run(HFEarlyStopping(patience=2, threshold=0.5), [3.0, 2.8, 2.7, 1.0])) == [3]
    assert _steps(_run(HFEarlyStopping(patience=2, threshold=0.5), [3.0, 2.4, 2.3, 1.8, 1.7])) == [4]


def test_hf_early_stopping_nan_first_value_leaves_the_best_at_infinity():
    assert _steps(_run(HFEarlyStopping(), [math.nan, 5.0, 5.0])) == [3]
    assert _steps(_run(HFEarlyStopping(patience=2), [1.0, math.nan, math.nan, 0.5])) == [3]


# torch ReduceLROnPlateau ---------------------------------------------------------------------

def test_reduce_lr_on_plateau_cuts_at_the_eleventh_bad_value_and_again_eleven_later():
    alarms = _run(TorchReduceLROnPlateau(), [1.0] * 40)
    assert _steps(alarms) == [12, 23, 34] and not any(a.stops for a in alarms)


def test_reduce_lr_on_plateau_relative_threshold():
    assert _steps(_run(TorchReduceLROnPlateau(), [1.0] + [0.99995] * 11)) == [12]  # 5e-5 < 1e-4: bad
    assert _run(TorchReduceLROnPlateau(), [1.0] + [1.0 - 2e-4 * k for k in range(1, 30)]) == []
    # a cooldown holds the count at 0
    assert _steps(_run(TorchReduceLROnPlateau(cooldown=5), [1.0] * 30)) == [12, 28]


# Lightning EarlyStopping ----------------------------------------------------------------------

def test_lightning_patience_counts_checks_without_improvement():
    alarms = _run(LightningEarlyStopping(), [3.0, 2.0, 2.0, 2.0, 2.0, 1.0])
    assert _steps(alarms) == [5] and alarms[0].cause == "PATIENCE_EXHAUSTED"


def test_lightning_min_delta_compares_with_the_best_so_far():
    # 2.95 + 0.1 is not < 3.0; 2.85 + 0.1 is: the wait count resets
    rule = LightningEarlyStopping(patience=2, min_delta=0.1)
    assert _run(rule, [3.0, 2.95, 2.85, 2.8]) == []
    assert rule.best == 2.85 and rule.wait == 1


def test_lightning_thresholds_are_strict_and_checked_before_patience():
    assert _steps(_run(LightningEarlyStopping(patience=None, divergence_threshold=5.0), [1.0, 5.0, 5.1])) == [3]
    stop = _run(LightningEarlyStopping(stopping_threshold=0.5), [1.0, 0.5, 0.4])
    assert _steps(stop) == [3] and stop[0].reasons == frozenset()  # a target reached: no anomaly
    nan = _run(LightningEarlyStopping(patience=None), [1.0, 0.9, math.inf])
    assert _steps(nan) == [3] and nan[0].reasons == {Reason.NONFINITE}
    # without check_finite a NaN is just no improvement
    assert _steps(_run(LightningEarlyStopping(check_finite=False), [1.0, math.nan, math.nan, math.nan])) == [4]


# llm-foundry KillLossSpike --------------------------------------------------------------------

def test_kill_loss_spike_fires_on_the_fifth_consecutive_outlier_not_the_fourth():
    base = [1.0] * 100
    assert _run(KillLossSpike(), base + [3.0] * 4 + [1.0] * 10) == []
    alarms = _run(KillLossSpike(), base + [3.0] * 5)
    assert _steps(alarms) == [105] and alarms[0].cause == "LossSpikeError"
    assert alarms[0].reasons == {Reason.SPIKE, Reason.DIVERGENCE} and alarms[0].stops


def test_kill_loss_spike_outliers_are_measured_against_a_window_that_takes_them_in():
    # at 2.05x the base, the 2nd outlier already lifts the window mean above half of it
    assert _run(KillLossSpike(), [1.0] * 100 + [2.05] * 20) == []


def test_kill_loss_spike_window_is_five_percent_of_the_run_and_fills_before_checking():
    series = [1.0] * 150 + [3.0] * 10
    assert _steps(_run(KillLossSpike(), series)) == [105 + 50]
    assert _run(KillLossSpike(total=4000), series) == []  # window 200: no check before value 201
    assert _steps(_run(KillLossSpike(total=4000), [1.0] * 200 + [3.0] * 5)) == [205]
    assert KillLossSpike(total=2010).total * 0.05 == pytest.approx(100.5)
    rule = KillLossSpike(total=2010)
    _run(rule, [1.0] * 101)
    assert rule.window_size == 100  # round(100.5) is 100 in Python


def test_kill_loss_spike_high_losses_use_the_cap_of_ten():
    alarms = _run(KillLossSpike(), [11.0] * 250)
    assert _steps(alarms) == [200] and alarms[0].cause == "HighLossError"
    assert alarms[0].reasons == {Reason.DIVERGENCE}
    # the source means to lower the cap to the first window's maximum, but only at the check
    # where the step equals the window, which Composer's counting never reaches: it stays 10
    rule = KillLossSpike()
    assert _run(rule, [1.0] * 100 + [1.5] * 300) == [] and rule.loss_cap == 10.0


def test_kill_loss_spike_a_nan_blinds_it_while_in_the_window():
    series = [1.0] * 100 + [math.nan] + [5.0] * 10
    assert _run(KillLossSpike(), series) == []
    assert _steps(_run(KillLossSpike(), [1.0] * 100 + [math.nan] + [1.0] * 100 + [5.0] * 5)) == [206]


# OLMo-core ------------------------------------------------------------------------------------

def _wiggle(n):
    return [1.0 + 0.1 * (i % 2) for i in range(n)]


def test_olmo_skip_step_starts_at_sixty_four_values_and_uses_the_sample_deviation():
    assert _steps(_run(OLMoSkipStep(), _wiggle(63) + [100.0])) == [64]
    assert _run(OLMoSkipStep(), _wiggle(62) + [100.0]) == []
    hist = _wiggle(128)
    mean, pop, sample = np.mean(hist), np.std(hist), np.std(hist, ddof=1)
    between = mean + 6 * (pop + sample) / 2  # above 6 population sigmas, below 6 sample sigmas
    assert _run(OLMoSkipStep(), hist + [between]) == []
    assert _steps(_run(OLMoStabilityMonitor(), hist + [between])) == [129]


def test_olmo_skip_step_skips_a_nan_and_every_step_while_it_is_in_the_window():
    alarms = _run(OLMoSkipStep(), _wiggle(100) + [math.nan] + _wiggle(200))
    assert _steps(alarms) == list(range(101, 101 + 129))
    assert all(a.reasons == {Reason.NONFINITE} for a in alarms)


def test_olmo_skip_step_checks_the_grad_norm_too():
    losses = _wiggle(80)
    gns = _wiggle(79) + [50.0]
    alarms = _run(OLMoSkipStep(), losses, gns)
    assert _steps(alarms) == [80] and alarms[0].reasons == {Reason.SPIKE}


def test_olmo_stability_monitor_needs_a_full_window_and_some_spread():
    assert _run(OLMoStabilityMonitor(), _wiggle(127) + [100.0]) == []
    assert _steps(_run(OLMoStabilityMonitor(), _wiggle(128) + [100.0])) == [129]
    assert _run(OLMoStabilityMonitor(), [1.0] * 128 + [100.0]) == []  # std 0: never a spike


# Megatron-LM ----------------------------------------------------------------------------------

def test_megatron_spiky_loss_is_ten_times_the_max_of_the_first_hundred_finite_values():
    base = [1.0] * 50 + [math.inf] + [1.0] * 50  # the inf stops training before anything else
    assert _steps(_run(MegatronChecks(), base)) == [51]
    series = [1.0] * 99 + [-1.2] + [11.9, 12.0, 3.0]  # |loss|: the max is 1.2
    alarms = _run(MegatronChecks(), series)
    assert _steps(alarms) == [102] and alarms[0].cause == "spiky_loss" and not alarms[0].stops


def test_megatron_non_finite_loss_or_grad_stops_the_run():
    alarms = _run(MegatronChecks(spiky=False), [1.0, 1.0, 1.0], [1.0, math.nan, 1.0])
    assert _steps(alarms) == [2] and alarms[0].cause == "nan_or_inf_grad" and alarms[0].stops
    assert _run(MegatronChecks(spiky=False), [1.0, 1.0], None) == []  # no grad norm logged: no check


# dlib -----------------------------------------------------------------------------------------

class _RLS:
    """dlib's running_gradient, transcribed from its recursion (2x2 recursive least squares
    started from R = 1e6 I), as the reference for the closed forms."""

    def __init__(self):
        self.n = 0
        self.R = np.eye(2) * 1e6
        self.w = np.zeros(2)
        self.rss = 0.0

    def add(self, y):
        x = np.array([self.n, 1.0])
        temp = 1 + x @ self.R @ x
        tmp = self.R @ x
        self.R = self.R - np.outer(tmp, tmp) / temp
        self.R = 0.5 * (self.R + self.R.T)
        self.w = self.w + self.R @ x * (y - x @ self.w)
        self.rss += (y - x @ self.w) ** 2 * temp
        self.n += 1

    def p_greater_than_zero(self):
        se = math.sqrt(self.rss / (self.n - 2) * 12.0 / (self.n ** 3 - self.n))
        if se == 0:
            return 1.0 if self.w[0] > 0 else (0.0 if self.w[0] < 0 else 0.5)
        return 1 - 0.5 * math.erfc(-(0 - self.w[0]) / se / math.sqrt(2))


def _count_reference(values, robust=False):
    vals = list(values)
    thresh = math.inf
    if robust:
        idx = int(math.floor((len(vals) - 1) * 0.9 + 0.5))
        thresh = sorted(vals)[idx]
    g, count = _RLS(), 0
    for j, v in enumerate(reversed(vals), 1):
        if v <= thresh:
            g.add(v)
        if g.n > 2 and g.p_greater_than_zero() < 0.51:
            count = j
    return count


def test_dlib_counts_match_a_transcription_of_its_recursion():
    rng = np.random.default_rng(3)
    agree = 0
    for _ in range(40):
        n = int(rng.integers(5, 200))
        trend = rng.uniform(-0.02, 0.02)
        y = 2.0 + trend * np.arange(n) + 0.1 * rng.standard_normal(n)
        y[rng.integers(0, n)] += 3.0  # one bad batch, for the robust variant to drop
        for robust in (False, True):
            agree += count_steps_without_decrease(y, robust=robust) == _count_reference(y, robust)
            ref = _RLS()
            kept = y if not robust else y[y <= sorted(y)[int(math.floor((n - 1) * 0.9 + 0.5))]]
            for v in kept:
                ref.add(v)
            assert probability_values_are_increasing(y, robust=robust) == pytest.approx(
                ref.p_greater_than_zero(), abs=1e-4)  # the 1e6 prior moves it by ~1e-6
    assert agree == 80


def test_dlib_count_edge_cases():
    assert count_steps_without_decrease([1.0] * 10) == 10  # flat: P(decrease) 0.5 < 0.51
    assert count_steps_without_decrease(list(range(10, 0, -1))) == 0  # strictly falling
    assert count_steps_without_decrease([5.0, 4.0, 3.0, 3.0, 3.0]) == 3
    assert count_steps_without_decrease([3.0, 2.0, 1.0, math.nan]) == 0  # a NaN fit says nothing


def test_dlib_plateau_cuts_the_lr_once_both_counts_reach_the_threshold():
    rng = np.random.default_rng(0)
    falling = list(3.0 * np.exp(-np.arange(400) / 100) + 0.01 * rng.standard_normal(400))
    assert _run(DlibPlateau(threshold=300), falling) == []
    flat = list(1.0 + 0.01 * rng.standard_normal(1500))
    alarms = _run(DlibPlateau(threshold=300), flat)
    assert alarms and alarms[0].step >= 300 and alarms[0].step % 2 == 0  # checked every 2 values
    # each cut drops the oldest 400 + 300 / 10 losses: all 300 held, so 300 new ones are needed
    assert len(alarms) >= 2 and all(b.step - a.step >= 300 for a, b in zip(alarms, alarms[1:]))
    assert not any(a.stops for a in alarms)


def test_dlib_reload_needs_a_save_first_then_thirty_values_and_escalates():
    rising = list(1.0 + 0.01 * np.arange(300))
    rule = DlibDivergence(sync_every=50)
    alarms = _run(rule, rising)
    assert _steps(alarms)[:1] == [100] and alarms[0].reasons == {Reason.DIVERGENCE}
    assert rule.threshold > 0.99
    assert _steps(_run(DlibDivergence(sync_every=10), rising[:30])) == []  # 20 values < 30
    nan = _run(DlibDivergence(sync_every=50), [1.0] * 60 + [math.nan] + [1.0] * 100)
    assert _steps(nan)[:1] == [100] and nan[0].reasons == {Reason.NONFINITE}


# the benchmark's configuration ----------------------------------------------------------------

def test_standard_peers_build_and_every_rule_returns_alarms_of_its_declared_reasons():
    rng = np.random.default_rng(1)
    losses = list(2.0 * np.exp(-np.arange(600) / 150) + 0.5 + 0.05 * rng.standard_normal(600))
    losses[400:] = [v * 5 for v in losses[400:]]
    losses[550] = math.nan
    gns = list(np.exp(0.2 * rng.standard_normal(600)))
    for spec in peers.standard_peers():
        rule = spec.build(600, losses[0])
        alarms = _run(rule, losses, gns)
        assert spec.shown_for <= rule.reasons
        for a in alarms:
            assert a.reasons <= rule.reasons, (spec.label, a)


def test_the_full_history_fit_answers_whether_the_count_reaches_the_length():
    rng = np.random.default_rng(5)
    for trial in range(300):
        n = int(rng.integers(3, 120))
        kind = trial % 4
        if kind == 0:
            y = 1.0 + rng.uniform(-0.01, 0.01) * np.arange(n) + 0.05 * rng.standard_normal(n)
        elif kind == 1:
            y = np.full(n, 2.0)
        elif kind == 2:
            y = 3.0 - 0.01 * np.arange(n)
        else:
            y = 1.0 + 0.05 * rng.standard_normal(n)
            y[rng.integers(0, n)] = math.nan
        full = bool(peers._decrease_uncertain(y[None, :])[0])
        assert (count_steps_without_decrease(y) >= n) == full, (trial, y)


def _streamed(rule, steps, losses, gns):
    out = []
    for i, s in enumerate(steps):
        a = rule.update(int(s), float(losses[i]), None if gns is None else float(gns[i]))
        if a is not None:
            out.append(a)
            if a.stops:
                break
    return out


def test_batch_paths_give_the_alarms_of_the_streaming_rules():
    from lossguard.testing.synthetic import ANOMALY_KINDS, HEALTHY_KINDS, make_curve

    rng = np.random.default_rng(9)
    series = []
    for j, kind in enumerate(HEALTHY_KINDS + ANOMALY_KINDS):
        for every in (1, 10):
            c = make_curve(kind, 300 + j, log_every=every, max_steps=700 if every == 1 else 3000)
            series.append((np.array([s.step for s in c.samples]), np.array([s.loss for s in c.samples]),
                           np.array([s.grad_norm for s in c.samples]), c.max_steps // every))
    for _ in range(3):  # rough series with gaps of NaN and inf, and exact repeats
        n = int(rng.integers(150, 500))
        y = np.round(1.0 + 0.2 * rng.standard_normal(n), 1)
        y[rng.integers(0, n, 3)] = [math.nan, math.inf, 30.0]
        series.append((np.arange(1, n + 1), y, np.abs(rng.standard_normal(n)), n))
    builders = [  # (rule, whether it reads grad norms)
        (lambda n: KillLossSpike(total=n), False), (lambda n: KillLossSpike(total=n, log_only=True), False),
        (lambda n: OLMoSkipStep(), True), (lambda n: OLMoStabilityMonitor(), True),
        (lambda n: DlibPlateau(threshold=200), False), (lambda n: DlibPlateau(threshold=60), False),
    ]
    compared = 0
    for steps, losses, gns, n in series:
        for build, reads_gn in builders:
            for g in ((gns, None) if reads_gn else (None,)):
                batch = replay(build(n), steps, losses, g)
                assert batch == _streamed(build(n), steps, losses, g), (build(n).name, n)
                compared += len(batch)
    assert compared > 300  # the comparison covered real alarms, not only silence


def test_a_knob_rebuilds_the_rule_with_another_setting():
    spec = next(s for s in peers.standard_peers() if s.name == "transformers EarlyStoppingCallback")
    five = spec.at(5, "chosen by hand")
    assert five.label == "transformers EarlyStoppingCallback (patience 5, chosen by hand)"
    assert five.build(100, 1.0).patience == 5 and spec.build(100, 1.0).patience == 1
    fixed = next(s for s in peers.standard_peers() if s.name == "OLMo-core StabilityMonitor")
    with pytest.raises(ValueError):
        fixed.at(3, "no knob")

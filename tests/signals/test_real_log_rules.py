"""Rules that real logs asked for: climbs on short logs, fp16 scaler skips, zero loss under a
live gradient. Streaming and batch paths give the same findings."""

import math

import numpy as np

from lossguard.records import Columns, Reason, Sample, Severity
from lossguard.signals.climb import ClimbDetector
from lossguard.signals.gradients import GradientDetector
from lossguard.signals.nonfinite import NonfiniteDetector
from lossguard.signals.suite import DetectorSuite


def _both(make, samples):
    one = make()
    streamed = [f for s in samples if (f := one.update(s)) is not None]
    batched = [f for _, f in make().update_many(Columns.from_samples(samples))]
    key = lambda f: (f.reason, f.severity, f.step, f.onset_step, f.message)  # noqa: E731 (evidence may hold NaN)
    assert [key(f) for f in batched] == [key(f) for f in streamed]
    return streamed


def _log(values, every=500):
    return [Sample(step=every * (i + 1), loss=v) for i, v in enumerate(values)]


def test_a_jump_that_stays_is_a_divergence_from_five_values():
    found = _both(ClimbDetector, _log([1.24, 2.03, 2.16, 1.98, 1.79]))
    assert len(found) == 1 and found[0].reason is Reason.DIVERGENCE and found[0].step == 2500
    assert found[0].onset_step == 500 and "1.6x the best level" in found[0].message


def test_a_qlora_jump_from_1_6_to_11_8_is_found_at_its_third_value():
    found = _both(ClimbDetector, _log([2.1, 1.8, 1.6, 11.8, 11.7, 11.9, 11.8, 11.8, 11.7, 11.8], every=10))
    assert len(found) == 1 and found[0].step == 60 and found[0].onset_step == 30


def test_falling_noisy_or_recovering_short_logs_are_not_climbs():
    rng = np.random.default_rng(0)
    falling = list(2.0 * np.exp(-np.arange(40) / 10) + 0.3)
    noisy = list(0.5 + 0.1 * rng.standard_normal(40))
    bump = [2.0, 1.5, 1.2, 2.0, 1.1, 1.0, 0.9, 0.85]  # one bad value, then back
    for values in (falling, noisy, bump):
        assert not _both(ClimbDetector, _log(values, every=50))


def test_long_logs_are_left_to_the_trend_test():
    values = [1.0] * 60 + [3.0] * 5
    assert not _both(ClimbDetector, _log(values, every=10))


def test_a_nan_grad_norm_under_a_finite_loss_is_information_and_a_nan_loss_after_it_is_critical():
    samples = [Sample(step=i, loss=2.0, grad_norm=1.0) for i in range(1, 5)]
    samples += [Sample(step=5, loss=2.0, grad_norm=math.inf), Sample(step=6, loss=math.nan, grad_norm=math.nan),
                Sample(step=7, loss=math.nan, grad_norm=math.nan), Sample(step=8, loss=2.0, grad_norm=1.0),
                Sample(step=9, loss=2.0, grad_norm=math.nan)]
    found = _both(NonfiniteDetector, samples)
    assert [(f.step, f.severity) for f in found] == [(5, Severity.INFO), (6, Severity.CRITICAL), (9, Severity.INFO)]
    assert "loss scaler" in found[0].message


def test_a_zero_loss_with_a_live_gradient_is_a_trivial_task():
    samples = [Sample(step=10 * i, loss=0.0 if i > 5 else 0.5 / i, grad_norm=5e-4) for i in range(1, 40)]
    found = _both(GradientDetector, samples)
    assert [f.reason for f in found] == [Reason.ZERO_LOSS] and found[0].onset_step == 60
    assert "gradient is alive" in found[0].message


def test_the_suite_reports_one_divergence_for_a_climb():
    suite = DetectorSuite()
    found = [f for s in _log([1.24, 2.03, 2.16, 1.98, 1.79]) for f in suite.observe(s)]
    assert [f.reason for f in found] == [Reason.DIVERGENCE]


def test_per_step_values_are_never_judged_by_the_climb_rule():
    # the callback's record: one batch per value, a reused model's loss rising in its first steps
    values = [1.5, 1.6, 1.5] + [2.4, 2.45, 2.43] * 8
    assert not _both(ClimbDetector, _log(values, every=1))
    # ... even when every fifth value happens to be five steps after the last one judged
    assert not _both(ClimbDetector, [Sample(step=s, loss=1.5 if s < 4 else 2.4) for s in range(1, 40)])

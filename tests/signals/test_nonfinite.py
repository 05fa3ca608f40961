import math

from lossguard.records import Reason, Sample, Severity
from lossguard.signals.nonfinite import NonfiniteDetector


def _feed(det, samples):
    return [f for s in samples if (f := det.update(s)) is not None]


def test_one_critical_finding_per_streak_of_nan_loss():
    samples = [Sample(step=i, loss=1.0) for i in range(1, 11)]
    samples += [Sample(step=i, loss=math.nan, grad_norm=2.0) for i in range(11, 16)]
    samples += [Sample(step=16, loss=1.0), Sample(step=17, loss=math.inf)]
    found = _feed(NonfiniteDetector(), samples)
    assert [(f.step, f.onset_step) for f in found] == [(11, 11), (17, 17)]
    assert found[0].severity == Severity.CRITICAL and found[0].reason == Reason.NONFINITE
    assert "loss nan" in found[0].message and "grad norm 2" in found[0].message


def test_infinite_grad_norm_with_finite_loss_is_reported():
    found = _feed(NonfiniteDetector(), [Sample(step=5, loss=1.2, grad_norm=-math.inf)])
    assert len(found) == 1 and "grad norm -inf" in found[0].message


def test_missing_values_do_not_end_a_streak():
    det = NonfiniteDetector()
    found = _feed(det, [Sample(step=1, loss=math.nan), Sample(step=2), Sample(step=3, loss=math.nan)])
    assert len(found) == 1 and det.count == 2

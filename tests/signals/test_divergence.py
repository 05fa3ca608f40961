
import numpy as np

from lossguard.records import Reason, Sample, Severity
from lossguard.signals.divergence import DivergenceDetector


def _curve(values, start=1, every=1):
    return [Sample(step=start + i * every, loss=float(v)) for i, v in enumerate(values)]


def _feed(det, samples):
    return [f for s in samples if (f := det.update(s)) is not None]


def test_sustained_rise_is_found_with_onset_near_the_turn():
    rng = np.random.default_rng(0)
    t = np.arange(600)
    base = 1 + 2 * (1 + t / 30) ** -0.5
    base[300:] = base[300] * (1 + 0.5 * (t[300:] - 300) / 200)
    found = _feed(DivergenceDetector(), _curve(base * (1 + 0.03 * rng.standard_normal(600))))
    assert len(found) == 1
    f = found[0]
    assert f.reason == Reason.DIVERGENCE and f.severity == Severity.CRITICAL
    assert 300 < f.step < 420 and 250 <= f.onset_step <= 330
    assert "above the best" in f.message


def test_noisy_flat_and_falling_curves_do_not_diverge():
    rng = np.random.default_rng(1)
    flat = 2.0 * (1 + 0.08 * rng.standard_t(4, 5000) / np.sqrt(2))
    assert _feed(DivergenceDetector(), _curve(flat)) == []
    t = np.arange(3000)
    falling = (0.5 + 2 * np.exp(-t / 500)) * (1 + 0.05 * rng.standard_normal(3000))
    assert _feed(DivergenceDetector(), _curve(falling)) == []


def test_sparse_logging_uses_step_spans():
    t = np.arange(0, 3000, 20)
    y = np.where(t < 1500, 2.0 - t / 3000, 1.5 * (1 + (t - 1500) / 600))
    found = _feed(DivergenceDetector(), _curve(y, start=20, every=20))
    assert len(found) == 1 and found[0].step <= 1500 + 300

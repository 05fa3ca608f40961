import math

import numpy as np

from lossguard.records import Reason, Sample
from lossguard.signals.spike import GradExplosionDetector, SpikeDetector


def _noisy(n, seed=0, level=2.0, rel=0.03):
    rng = np.random.default_rng(seed)
    return [Sample(step=i + 1, loss=float(level * (1 + rel * rng.standard_normal())),
                   grad_norm=float(np.exp(0.2 * rng.standard_normal()))) for i in range(n)]


def _feed(det, samples):
    return [f for s in samples if (f := det.update(s)) is not None]


def test_single_spike_is_found_with_its_numbers():
    samples = _noisy(300)
    samples[200] = Sample(step=201, loss=7.9, grad_norm=1.0)
    found = _feed(SpikeDetector(), samples)
    assert [(f.reason, f.step, f.onset_step) for f in found] == [(Reason.SPIKE, 201, 201)]
    assert "7.9 >" in found[0].message and "median 2" in found[0].message
    assert 0 < found[0].evidence["spike_score"] < 0.01


def test_consecutive_spiking_samples_are_one_finding():
    samples = _noisy(300)
    for i in range(150, 155):
        samples[i] = Sample(step=i + 1, loss=6.0)
    assert len(_feed(SpikeDetector(), samples)) == 1


def test_clean_noise_and_a_falling_curve_do_not_spike():
    assert _feed(SpikeDetector(), _noisy(3000, seed=3)) == []
    falling = [Sample(step=i, loss=1 + 2 * (1 + i / 50) ** -0.5) for i in range(1, 2000)]
    assert _feed(SpikeDetector(), falling) == []


def test_grad_norm_explosion():
    samples = _noisy(200, seed=1)
    samples[120] = Sample(step=121, loss=2.0, grad_norm=40.0)
    found = _feed(GradExplosionDetector(), samples)
    assert [(f.reason, f.step) for f in found] == [(Reason.GRAD_EXPLOSION, 121)]
    assert "40" in found[0].message


def test_nonfinite_and_missing_values_are_ignored():
    det = SpikeDetector()
    assert det.update(Sample(step=1, loss=math.nan)) is None
    assert det.update(Sample(step=2)) is None
    assert len(det.loss_window) == 0

"""Each detector's batch path (``update_many``) equals its streaming path (``update``) under
non-default windows too, and across a split of the stream (the plateau detector is tested in
test_batch.py through the suite)."""

import math

import numpy as np
import pytest

from lossguard.config import DetectionConfig
from lossguard.records import Columns, Sample
from lossguard.signals.degenerate import DegenerateLossDetector
from lossguard.signals.divergence import DivergenceDetector
from lossguard.signals.gradients import GradientDetector
from lossguard.signals.nonfinite import NonfiniteDetector
from lossguard.signals.spike import GradExplosionDetector, SpikeDetector
from lossguard.testing.synthetic import make_curve

CONFIGS = [
    DetectionConfig(),
    DetectionConfig(spike_window=8, min_history=2, divergence_window=10),
    DetectionConfig(spike_window=20, divergence_window=17),
    DetectionConfig(spike_window=200, min_history=300, divergence_window=120),
]


def _batch(det, st, lo, gn, lr, hl, hg):
    return det.update_many(Columns(st, lo, gn, lr, np.full(len(st), np.nan), hl, hg))


def _arrays(samples):
    def col(name):
        return np.array([math.nan if getattr(s, name) is None else getattr(s, name) for s in samples], dtype=float)

    return (np.array([s.step for s in samples], dtype=np.int64), col("loss"), col("grad_norm"), col("lr"),
            np.array([s.loss is not None for s in samples]), np.array([s.grad_norm is not None for s in samples]))


def _check(make, samples, split):
    splits = [split] if isinstance(split, int) else list(split)
    one, many = make(), make()
    expected = []
    for i, s in enumerate(samples):
        f = one.update(s)
        if f is not None:
            expected.append((i, f.step, f.onset_step, f.message))
    st, lo, gn, lr, hl, hg = _arrays(samples)
    got = []
    cuts = [0, *splits, len(samples)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        got += [(a + i, f.step, f.onset_step, f.message)
                for i, f in _batch(many, st[a:b], lo[a:b], gn[a:b], lr[a:b], hl[a:b], hg[a:b])]
    assert got == expected
    assert many.state_dict() == one.state_dict()
    return len(expected)


def _noisy_run(seed: int, n: int = 1500):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(1, n + 1):
        loss = 2.0 * (1 + i / 100) ** -0.3 + 0.05 * rng.standard_normal()
        gn = float(np.exp(0.3 * rng.standard_normal()))
        if rng.random() < 0.01:
            loss += 3.0
        if rng.random() < 0.01:
            gn *= 40
        if 700 <= i < 800:
            loss += (i - 700) * 0.01  # a climb
        if rng.random() < 0.02:
            loss = None
        if rng.random() < 0.02:
            gn = None
        if rng.random() < 0.003:
            loss = math.nan
        out.append(Sample(step=i, loss=loss, grad_norm=gn, lr=1e-4 * min(1.0, i / 200) if i % 7 else None))
    return out


DETECTORS = [SpikeDetector, GradExplosionDetector, DivergenceDetector, GradientDetector, NonfiniteDetector,
             DegenerateLossDetector]


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_batch_equals_streaming_under_other_windows(cfg):
    config = CONFIGS[cfg]
    found = 0
    for seed in range(3):
        samples = _noisy_run(seed)
        for cls in DETECTORS:
            make = (lambda cls=cls: cls()) if cls is NonfiniteDetector else (lambda cls=cls: cls(config))
            found += _check(make, samples, split=[1, 150, 901][seed])
    for kind, every in (("spike_cluster", 1), ("divergence_fast", 10), ("staircase", 1)):
        samples = make_curve(kind, 7 + cfg, log_every=every).samples
        for cls in (SpikeDetector, GradExplosionDetector, DivergenceDetector):
            found += _check(lambda cls=cls: cls(config), samples, split=len(samples) // 2)
    assert found >= 20  # the comparison covered real findings, not only silence


def test_gradient_streaks_carry_across_batches():
    # zero loss and zero grad norm (labels masked), vanishing grad norms, and stretches with
    # nothing logged in between, cut so that a streak is open at every cut
    samples = []
    for i in range(1, 400):
        loss, gn = 2.0, 1.0
        if 50 <= i < 120:
            loss, gn = 0.0, 0.0
        elif 200 <= i < 300:
            gn = 1e-9
        if i in range(100, 106) or i in range(250, 256) or i in range(320, 330):
            loss = gn = None
        samples.append(Sample(step=i, loss=loss, grad_norm=gn))
    for cfg in (DetectionConfig(), DetectionConfig(vanishing_window=10)):
        found = _check(lambda cfg=cfg: GradientDetector(cfg), samples, split=(100, 103, 250, 252, 320, 325))
        assert found == 2


@pytest.mark.parametrize("tail", [1, 2, 3, 4])
def test_batch_with_fewer_new_values_than_a_refresh_interval(tail):
    # past warm-up, a batch whose few finite values hold no scheduled refresh of the spike
    # threshold (every 4th value) raised IndexError: a log that turns NaN for good, say
    samples = [s if i < 200 or i >= 400 - tail else Sample(step=s.step, loss=math.nan, grad_norm=s.grad_norm)
               for i, s in enumerate(_noisy_run(0, 400))]
    samples[-1] = Sample(step=400, loss=9.0, grad_norm=1.0)  # a spike among them
    for cls in (SpikeDetector, GradExplosionDetector, DivergenceDetector):
        _check(lambda cls=cls: cls(DetectionConfig()), samples, split=200)
    assert _check(lambda: SpikeDetector(DetectionConfig()), samples, split=200) >= 1

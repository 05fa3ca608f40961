"""``DetectorSuite.observe_many`` (the offline path) gives exactly what ``observe`` gives, sample by sample."""

import math

import numpy as np
import pytest

from lossguard.records import Columns, Sample
from lossguard.signals.suite import DetectorSuite
from lossguard.testing.synthetic import ANOMALY_KINDS, HEALTHY_KINDS, make_curve


def _arrays(samples):
    def col(name):
        return np.array([np.nan if getattr(s, name) is None else getattr(s, name) for s in samples], dtype=float)

    return (np.array([s.step for s in samples]), col("loss"), col("grad_norm"), col("lr"), col("epoch"),
            np.array([s.loss is not None for s in samples]), np.array([s.grad_norm is not None for s in samples]))


def _key(f):
    return (f.reason, f.severity, f.step, f.onset_step, f.message, f.detector)


def _compare(samples, max_steps, split=None):
    one = DetectorSuite(max_steps=max_steps)
    expected = [_key(f) for s in samples for f in one.observe(s)]
    many = DetectorSuite(max_steps=max_steps)
    st, lo, gn, lr, ep, hl, hg = _arrays(samples)
    got = []
    cuts = [0, len(samples)] if split is None else [0, split, len(samples)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        got += [_key(f) for f in many.observe_many(Columns(st[a:b], lo[a:b], gn[a:b], lr[a:b], ep[a:b],
                                                             hl[a:b], hg[a:b]))]
    assert got == expected
    assert many.state_dict() == one.state_dict()
    return expected


@pytest.mark.parametrize("every", [1, 10])
def test_batch_equals_streaming_on_every_curve_kind(every):
    reasons = set()
    for j, kind in enumerate(HEALTHY_KINDS + ANOMALY_KINDS):
        for seed in range(2):
            curve = make_curve(kind, 500 + 10 * j + seed, log_every=every)
            found = _compare(curve.samples, curve.max_steps, split=len(curve.samples) // 3 if seed else None)
            reasons |= {k[0] for k in found}
    assert len(reasons) >= 3  # the comparison covered real findings, not only silence


def test_batch_equals_streaming_with_missing_values_zero_losses_and_rl_losses():
    rng = np.random.default_rng(3)
    samples = []
    for i in range(1, 1500):
        loss = float(2 + 0.05 * rng.standard_normal())
        gn = float(np.exp(0.2 * rng.standard_normal()))
        if 300 <= i < 340:
            loss, gn = 0.0, 0.0
        if 500 <= i < 530:
            gn = 0.0
        if i % 97 == 0:
            loss = None
        if i % 89 == 0:
            gn = None
        if i == 700:
            loss = math.nan
        if i in (800, 801):
            loss = 9.0
        samples.append(Sample(step=i, loss=loss, grad_norm=gn, lr=1e-4))
    found = _compare(samples, 3000)
    assert {k[0].value for k in found} >= {"zero_loss", "grad_vanishing", "nonfinite", "spike"}
    rl = [Sample(step=i, loss=float(0.02 * rng.standard_normal()), grad_norm=0.5) for i in range(1, 800)]
    assert [k[0].value for k in _compare(rl, 2000)] == ["not_a_convergence_signal"]

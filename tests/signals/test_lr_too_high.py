"""Gradient explosions again and again while the loss goes nowhere: the learning rate."""

import numpy as np

from lossguard.config import GuardConfig
from lossguard.guard import Guard
from lossguard.records import Reason, Sample, Severity
from lossguard.signals.suite import DetectorSuite


def _run(fall_per_step=0.0, every=60, n=400, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(1, n + 1):
        gn = float(0.2 * np.exp(0.1 * rng.standard_normal()))
        if i > 40 and i % every == 0:
            gn *= 40.0  # the optimizer overshoots; clipping keeps the loss from showing it
        loss = 2.9 - fall_per_step * i + 0.02 * rng.standard_normal()
        out.append(Sample(step=i, loss=float(loss), grad_norm=gn, lr=3e-2))
    return out


def test_repeated_explosions_without_progress_are_an_lr_too_high_finding():
    suite = DetectorSuite(max_steps=2000)
    found = [f for s in _run() for f in suite.observe(s)]
    lr = [f for f in found if f.reason is Reason.LR_TOO_HIGH]
    assert len(lr) == 1 and lr[0].severity is Severity.WARNING
    assert lr[0].step == 180 and lr[0].onset_step == 60 and lr[0].evidence["explosions"] == [60, 120, 180]
    assert "lower learning rate" in lr[0].message
    # the explosions themselves are folded by the cooldown as before
    assert [f.step for f in found if f.reason is Reason.GRAD_EXPLOSION] == [60, 120, 180, 240, 300, 360]


def test_explosions_while_the_loss_falls_are_events_not_a_pattern():
    suite = DetectorSuite(max_steps=2000)
    found = [f for s in _run(fall_per_step=0.003) for f in suite.observe(s)]
    assert not [f for f in found if f.reason is Reason.LR_TOO_HIGH]


def test_lr_too_high_triggers_a_rollback():
    guard = Guard(GuardConfig(), max_steps=2000)
    acted = [(s.step, d.rollback_to) for s in _run() if (d := guard.decide(s, [0, 50, 100], flush=True)).rollback_to is not None]
    assert acted and acted[0][0] == 180 and acted[0][1] <= 50

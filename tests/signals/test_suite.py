import json
import math

import numpy as np

from lossguard.config import DetectionConfig
from lossguard.records import Reason, Sample
from lossguard.signals.suite import DetectorSuite
from lossguard.testing.synthetic import make_curve


def _run(suite, samples):
    return [f for s in samples for f in suite.observe(s)]


def test_every_finding_names_its_detector_and_a_streak_is_reported_once():
    samples = [Sample(step=i, loss=2.0 + 0.01 * math.sin(i), grad_norm=1.0) for i in range(1, 100)]
    samples += [Sample(step=i, loss=math.nan, grad_norm=math.nan) for i in range(100, 140)]
    # run length unknown: a loss flat from the first step would (rightly) be an early convergence
    found = _run(DetectorSuite(), samples)
    assert [(f.reason, f.step) for f in found] == [(Reason.NONFINITE, 100)]
    assert found[0].detector == "nonfinite"


def test_cooldown_folds_a_cluster_of_spikes_into_one_finding():
    rng = np.random.default_rng(0)
    samples = [Sample(step=i, loss=float(2 + 0.02 * rng.standard_normal())) for i in range(1, 400)]
    for at in (200, 210, 225, 240):
        samples[at - 1] = Sample(step=at, loss=8.0)
    spikes = [f for f in _run(DetectorSuite(), samples) if f.reason == Reason.SPIKE]
    assert [f.step for f in spikes] == [200]
    spikes = [f for f in _run(DetectorSuite(DetectionConfig(cooldown_steps=0)), samples) if f.reason == Reason.SPIKE]
    assert [f.step for f in spikes] == [200, 210, 225, 240]


def test_set_progress_enables_early_convergence():
    curve = make_curve("plateau", 6, log_every=1)
    suite = DetectorSuite()
    suite.set_progress(max_steps=curve.max_steps, num_train_epochs=None)
    assert suite.max_steps == curve.max_steps
    assert any(f.reason == Reason.EARLY_CONVERGENCE for f in _run(suite, curve.samples))


def test_progress_from_epochs_when_max_steps_is_unknown():
    curve = make_curve("plateau", 6, log_every=1)
    samples = [Sample(step=s.step, loss=s.loss, epoch=s.step / curve.max_steps) for s in curve.samples]
    found = _run(DetectorSuite(num_train_epochs=1.0), samples)
    assert any(f.reason == Reason.EARLY_CONVERGENCE for f in found)


def test_state_dict_round_trip_of_the_whole_suite():
    curve = make_curve("divergence_slow", 5, log_every=1)
    half = 900  # before the divergence is found (step 964), so the restored copy must find it too
    a = DetectorSuite(max_steps=curve.max_steps)
    _run(a, curve.samples[:half])
    b = DetectorSuite()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    fa, fb = _run(a, curve.samples[half:]), _run(b, curve.samples[half:])
    assert fa and [f.to_record() for f in fa] == [f.to_record() for f in fb]


def test_rollback_restores_state_and_restarts_windows():
    curve = make_curve("power", 7, log_every=1)
    suite = DetectorSuite(max_steps=curve.max_steps)
    _run(suite, curve.samples[:300])
    snap = json.loads(json.dumps(suite.state_dict()))
    _run(suite, curve.samples[300:500])
    suite.load_state_dict(snap)
    suite.reset_after_rollback(300)
    assert suite.plateau.seg_start is None and len(suite.divergence.trend) == 0
    later = [Sample(step=s.step + 200, loss=s.loss, grad_norm=s.grad_norm, lr=s.lr) for s in curve.samples[300:600]]
    assert not [f for f in _run(suite, later) if f.reason in (Reason.DIVERGENCE, Reason.EARLY_CONVERGENCE)]

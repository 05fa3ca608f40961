
import numpy as np

from lossguard.records import Reason, Sample, Severity
from lossguard.signals.degenerate import DegenerateLossDetector
from lossguard.signals.suite import DetectorSuite


def _grpo(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    return [Sample(step=i + 1, loss=float(0.02 * rng.standard_normal()), grad_norm=0.5) for i in range(n)]


def test_loss_around_zero_gets_one_info_finding():
    det = DegenerateLossDetector()
    found = [f for s in _grpo() if (f := det.update(s)) is not None]
    assert len(found) == 1
    assert found[0].reason == Reason.NOT_A_CONVERGENCE_SIGNAL and found[0].severity == Severity.INFO
    assert found[0].step <= 20 and det.active


def test_cross_entropy_losses_are_not_degenerate():
    det = DegenerateLossDetector()
    assert all(det.update(Sample(step=i, loss=2.0 / i)) is None for i in range(1, 500))
    assert not det.active


def test_suite_raises_no_plateau_or_divergence_on_an_rl_loss():
    suite = DetectorSuite(max_steps=4000)
    samples = _grpo(1000) + [Sample(step=i, loss=0.3 + 0.001 * i, grad_norm=0.5) for i in range(1001, 2000)]
    reasons = {f.reason for s in samples for f in suite.observe(s)}
    assert Reason.NOT_A_CONVERGENCE_SIGNAL in reasons
    assert not reasons & {Reason.EARLY_CONVERGENCE, Reason.DIVERGENCE}

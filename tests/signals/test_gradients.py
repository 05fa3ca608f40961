
from lossguard.records import Reason, Sample
from lossguard.signals.gradients import GradientDetector


def _feed(det, samples):
    return [f for s in samples if (f := det.update(s)) is not None]


def test_zero_loss_with_zero_grad_norm_says_labels_may_be_masked():
    samples = [Sample(step=i, loss=1.0, grad_norm=1.0) for i in range(1, 11)]
    samples += [Sample(step=i, loss=0.0, grad_norm=0.0) for i in range(11, 60)]
    found = _feed(GradientDetector(), samples)
    assert [(f.reason, f.step, f.onset_step) for f in found] == [(Reason.ZERO_LOSS, 30, 11)]
    assert "labels may be fully masked" in found[0].message


def test_vanishing_grad_norm_with_a_nonzero_loss():
    samples = [Sample(step=i, loss=2.0, grad_norm=1e-10) for i in range(1, 50)]
    found = _feed(GradientDetector(), samples)
    assert [(f.reason, f.onset_step, f.step) for f in found] == [(Reason.GRAD_VANISHING, 1, 20)]


def test_a_healthy_step_ends_the_streak():
    samples = [Sample(step=i, loss=2.0, grad_norm=1e-10 if i % 10 else 0.5) for i in range(1, 200)]
    assert _feed(GradientDetector(), samples) == []

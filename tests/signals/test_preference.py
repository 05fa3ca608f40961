"""A sigmoid-family preference loss (DPO) against ln 2: nothing learned, or worse than the reference."""

import math

import numpy as np
import pytest

from lossguard.config import RecoveryConfig
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.recovery.policy import RecoveryPolicy
from lossguard.signals.preference import LN2
from lossguard.signals.references import Objective, References
from lossguard.signals.suite import DetectorSuite
from lossguard.testing.corpus import read_labels, read_log

DPO = References(objective=Objective.PREFERENCE, sources={"objective": "trainer class DPOTrainer"})


def _suite(refs: References = DPO) -> DetectorSuite:
    suite = DetectorSuite(max_steps=200)
    suite.set_references(refs)
    return suite


def _found(suite: DetectorSuite, samples) -> list[Finding]:
    out = []
    for s in samples:
        out += suite.observe(s)
    return [f for f in out if f.detector == "preference"]


def test_identical_pairs_sit_at_ln2_with_no_gradient_and_are_found():
    # the testbed's dpo-same-pair: exactly ln 2, grad norm 0 with float noise of ~1e-7 at some steps
    samples = [Sample(step=i, loss=LN2, grad_norm=0.0 if i % 2 else 9e-8) for i in range(1, 26)]
    found = _found(_suite(), samples)
    assert [(f.reason, f.severity, f.step, f.onset_step) for f in found] == \
        [(Reason.EARLY_CONVERGENCE, Severity.WARNING, 20, 1)]
    ev = found[0].evidence
    assert ev["reference_level"] == pytest.approx(LN2) and ev["actionable"] is False and "zero gradient" in ev["support"]


def test_a_warmup_at_ln2_with_a_live_gradient_is_not_a_finding():
    # real DPO logs sit at ln 2 for 60 steps while the LR warms up from 1e-9; the gradient is not zero
    samples = [Sample(step=i, loss=LN2, grad_norm=20.0) for i in range(1, 80)]
    samples += [Sample(step=i, loss=LN2 - 0.002 * (i - 79), grad_norm=20.0) for i in range(80, 120)]
    assert _found(_suite(), samples) == []


def test_a_policy_worse_than_its_reference_is_a_divergence_and_a_noisy_healthy_one_is_not():
    rng = np.random.default_rng(0)
    worse = [Sample(step=1, loss=LN2, grad_norm=1.0), Sample(step=2, loss=LN2, grad_norm=1.0)]
    worse += [Sample(step=i, loss=float(0.9 + 0.3 * rng.random()), grad_norm=50.0) for i in range(3, 26)]
    found = _found(_suite(), worse)
    assert [(f.reason, f.severity, f.step, f.onset_step) for f in found] == [(Reason.DIVERGENCE, Severity.WARNING, 10, 3)]
    assert found[0].evidence["level"] > 1.15 * LN2 and found[0].evidence["actionable"] is False
    # a healthy DPO run: noisy per step (0.1-1.3), median below ln 2
    healthy = [Sample(step=1, loss=LN2, grad_norm=1.0)]
    healthy += [Sample(step=i, loss=float(np.clip(0.45 + 0.3 * rng.standard_normal(), 0.05, 1.3)), grad_norm=10.0)
                for i in range(2, 300)]
    assert _found(_suite(), healthy) == []


def test_only_a_preference_loss_that_starts_at_ln2_is_read():
    stuck = [Sample(step=i, loss=LN2, grad_norm=0.0) for i in range(1, 40)]
    assert _found(_suite(References(objective=Objective.CROSS_ENTROPY)), stuck) == []  # a binary CE may sit there
    ipo = [Sample(step=1, loss=25.0, grad_norm=0.0)] + stuck  # an IPO-style loss: another level
    assert _found(_suite(), ipo) == []


def test_the_real_dpo_logs_of_the_corpus_raise_nothing_from_it():
    from lossguard.analysis import analyze

    ids = {"hf-0027", "hf-0040", "hf-0085", "hf-0126"}  # TRL DPO runs, every one starting at ln 2
    rows = [r for r in read_labels() if r["id"] in ids]
    assert len(rows) == len(ids)
    for row in rows:
        log = read_log(row)
        first = next(s.loss for s in log.samples if s.loss is not None and math.isfinite(s.loss))
        assert first == pytest.approx(LN2, abs=1e-3), row["id"]  # read by the detector...
        assert [f for f in analyze(log).findings if f.detector == "preference"] == [], row["id"]  # ...and quiet


def test_the_policy_does_not_act_on_a_finding_that_is_not_actionable():
    pol = RecoveryPolicy(RecoveryConfig(smooth_window=5))
    for step in range(1, 50):
        pol.step(step, LN2, [], [0, 20, 40])
    finding = Finding(Reason.DIVERGENCE, Severity.WARNING, 50, 40, "worse", evidence={"actionable": False})
    d = pol.step(50, 1.0, [finding], [0, 20, 40])
    assert d.rollback_to is None and d.actions == []


def test_spikes_and_zeros_of_an_rl_loss_are_info_and_the_same_spike_on_a_cross_entropy_is_a_warning():
    # a GRPO loss: exactly 0 until the KL term grows, then 1e-4 with a jump to 3e-4 (hf-0127's shape)
    values = [0.0] * 30 + [1e-4] * 40 + [3e-4] + [1e-4] * 20
    suite = _suite(References(objective=Objective.RL, sources={"objective": "trainer class GRPOTrainer"}))
    rl = [f for i, v in enumerate(values, 1) for f in suite.observe(Sample(step=i, loss=v, grad_norm=0.5))]
    assert {f.reason for f in rl} >= {Reason.NOT_A_CONVERGENCE_SIGNAL}
    assert all(f.severity is Severity.INFO for f in rl), [(f.reason, f.severity) for f in rl]
    # the same jump on a loss read as a cross-entropy (a level of 2, a jump to 6) is a warning
    ce = _suite(References(objective=Objective.CROSS_ENTROPY))
    curve = [2.0 + 0.01 * (-1) ** i for i in range(70)] + [6.0] + [2.0] * 20
    found = [f for i, v in enumerate(curve, 1) for f in ce.observe(Sample(step=i, loss=v, grad_norm=0.5))]
    assert [(f.reason, f.severity) for f in found if f.severity is not Severity.INFO] == [(Reason.SPIKE, Severity.WARNING)]

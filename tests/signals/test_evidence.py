"""A plateau is acted on only with evidence beyond the curve; otherwise it is information."""

import numpy as np

from lossguard.config import GuardConfig
from lossguard.guard import Guard
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.evidence import eval_trend, judge_divergence
from lossguard.signals.references import References
from lossguard.signals.suite import DetectorSuite

UNIGRAM = References(uniform=3.30, unigram=2.92, sources={"unigram": "test"})


def _stalled(n=300, level=2.93, drift=0.0, seed=0):
    """Down from the uniform level within a few steps, then sitting at ``level`` (drifting down
    ``drift`` per step): the tiny model at a learning rate too high for it."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(1, n + 1):
        base = level + (3.3 - level) * np.exp(-i / 3.0) - drift * i
        out.append(Sample(step=i, loss=float(base + 0.03 * rng.standard_normal()), grad_norm=1.0, lr=3e-2))
    return out


def _early(samples, refs, evals=(), max_steps=600):
    suite = DetectorSuite(max_steps=max_steps)
    suite.set_references(refs)
    for step, loss in evals:
        suite.observe_eval(step, loss)
    return [f for s in samples for f in suite.observe(s) if f.reason is Reason.EARLY_CONVERGENCE]


def test_eval_trend():
    evals = [(100, 2.0), (200, 1.9), (300, 1.89)]
    assert eval_trend(evals, 100, 300) == "falling"
    assert eval_trend(evals, 200, 300) == "flat"
    assert eval_trend(evals, 250, 300) == "flat"  # from the last evaluation before the onset
    assert eval_trend([(100, 2.0), (200, 2.5)], 100, 200) == "rising"
    assert eval_trend(evals, 100, 150) is None  # one evaluation by then
    assert eval_trend([], 0, 10) is None


def test_a_stall_at_the_unigram_level_is_corroborated_and_acted_on():
    found = _early(_stalled(), UNIGRAM)
    assert len(found) == 1 and found[0].severity is Severity.WARNING
    f = found[0]
    assert f.evidence["confidence"] == "corroborated" and f.evidence["reference"] == "unigram"
    assert f.step <= 150 and f.onset_step <= 30
    assert "unigram level 2.92" in f.message

    guard = Guard(GuardConfig(), max_steps=600)
    guard.set_references(UNIGRAM)
    rolled = [d.rollback_to for s in _stalled() if (d := guard.decide(s, [0], flush=True)).rollback_to is not None]
    assert rolled[0] == 0  # (the stream goes on stalling after it: relapse rollbacks follow)


def test_a_slowly_drifting_stall_near_the_level_is_acted_on_only_with_the_references():
    # 2.93 -> 2.83 over 300 steps: without references a suspicion, with them a corroborated stall
    samples = _stalled(drift=3e-4)
    assert not [f for f in _early(samples, References()) if f.severity is not Severity.INFO]
    found = _early(samples, UNIGRAM)
    assert len(found) == 1 and found[0].severity is Severity.WARNING and found[0].evidence["reference"] == "unigram"


def test_the_reference_rule_alone_finds_a_stall_the_shape_rules_miss():
    # a stall whose shape passes for a slow healthy decay (2.93 -> 2.80 in 200 steps, quiet noise)
    from lossguard.config import DetectionConfig

    cfg = DetectionConfig(stall_z=100.0, plateau_z=100.0)  # the shape rules cannot fire
    suite = DetectorSuite(cfg, max_steps=600)
    suite.set_references(UNIGRAM)
    found = [f for s in _stalled(drift=6e-4) for f in suite.observe(s)]
    assert len(found) == 1 and found[0].evidence["rule"] == "reference" and found[0].severity is Severity.WARNING
    assert "not been more than 10% below the unigram level 2.92" in found[0].message


def test_the_same_stall_far_below_the_references_is_only_information():
    # a pretrained model's SFT sitting at 2.9 nats when its labels' unigram level is 7.5: it has learned
    refs = References(uniform=11.9, unigram=7.5)
    found = _early(_stalled(), refs)
    assert len(found) == 1 and found[0].severity is Severity.INFO
    assert found[0].evidence["confidence"] == "shape_only" and "39% of the unigram level" in found[0].message

    guard = Guard(GuardConfig(), max_steps=600)
    guard.set_references(refs)
    decisions = [guard.decide(s, [0], flush=True) for s in _stalled()]
    assert [f.reason for d in decisions for f in d.findings] == [Reason.EARLY_CONVERGENCE]
    assert all(d.rollback_to is None and not d.actions for d in decisions)


def test_a_falling_eval_loss_contradicts_a_plateau():
    found = _early(_stalled(), UNIGRAM, evals=[(10, 3.0), (50, 2.9), (100, 2.7)])
    assert len(found) == 1 and found[0].severity is Severity.INFO
    assert found[0].evidence["confidence"] == "contradicted" and "eval loss is still falling" in found[0].message


def test_a_run_from_scratch_passing_through_the_unigram_level_is_left_alone():
    rng = np.random.default_rng(3)
    samples = []
    for i in range(1, 301):
        # three slow phases: the uniform level, the unigram level for ~60 steps, then learning
        loss = 2.92 + 0.38 * np.exp(-i / 5.0) if i < 60 else 2.92 * np.exp(-(i - 60) / 40.0) + 0.05
        samples.append(Sample(step=i, loss=float(loss + 0.02 * rng.standard_normal()), grad_norm=1.0, lr=3e-3))
    assert not [f for f in _early(samples, UNIGRAM) if f.severity is not Severity.INFO]


def test_a_divergence_the_eval_loss_does_not_share_is_information():
    f = Finding(reason=Reason.DIVERGENCE, severity=Severity.WARNING, step=500, onset_step=300, message="Divergence.")
    assert judge_divergence(f, [(200, 1.0), (400, 1.0), (500, 1.001)]).severity is Severity.INFO
    g = Finding(reason=Reason.DIVERGENCE, severity=Severity.WARNING, step=500, onset_step=300, message="Divergence.")
    assert judge_divergence(g, [(200, 1.0), (500, 1.4)]).severity is Severity.WARNING
    assert g.evidence["confidence"] == "corroborated"
    h = Finding(reason=Reason.DIVERGENCE, severity=Severity.WARNING, step=500, onset_step=300, message="Divergence.")
    assert judge_divergence(h, []).severity is Severity.WARNING  # no evaluations: the curve alone decides

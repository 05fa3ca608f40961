"""The engine: detectors -> findings -> (probe verdict) -> policy -> actions, without torch."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest

from lossguard.config import GuardConfig
from lossguard.guard import Guard
from lossguard.records import ActionKind, Finding, Reason, Sample, Severity
from lossguard.signals.references import References
from lossguard.testing.synthetic import ANOMALY_KINDS, make_curve


class _PlateauAt:
    """A detector stand-in that reports one premature plateau at a given step."""

    def __init__(self, step: int, onset: int):
        self.step, self.onset = step, onset

    def observe(self, sample: Sample) -> list[Finding]:
        if sample.step != self.step:
            return []
        return [Finding(Reason.EARLY_CONVERGENCE, Severity.WARNING, self.step, self.onset, "plateau since 150.")]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def reset_after_rollback(self, step: int) -> None:
        pass


def _run(verdict: str | None, needs_saddle: bool) -> tuple[list, list]:
    config = GuardConfig(recovery={"plateau_needs_saddle": needs_saddle})
    guard = Guard(config, max_steps=1000, detectors=_PlateauAt(300, 250))
    asked: list[int] = []

    def probe(finding: Finding) -> dict | None:
        asked.append(finding.step)
        if verdict is None:
            return {"kind": "probe", "skipped": True, "reason": "lora_b_zero"}
        return {"kind": "probe", "verdict": verdict, "ratio": -0.2 if verdict == "saddle" else 0.01,
                "lambda_max": 10.0, "lambda_min": -2.0 if verdict == "saddle" else 0.1}

    snapshots = list(range(0, 301, 25))
    findings, actions = [], []
    for step in range(1, 301):
        d = guard.decide(Sample(step=step, loss=2.0), snapshots, probe=probe)
        findings += d.findings
        actions += d.actions
    assert asked == [300]  # probed once, on the plateau, before the policy decided
    return findings, actions


def test_verdict_is_attached_to_the_plateau_finding():
    findings, _ = _run("saddle", needs_saddle=False)
    assert findings[0].evidence["probe"] == {"verdict": "saddle", "ratio": -0.2, "lambda_max": 10.0,
                                             "lambda_min": -2.0}
    assert findings[0].message == "plateau since 150. Hessian probe: saddle (lambda_min/lambda_max = -0.2)."


def test_an_inconclusive_verdict_says_why_instead_of_a_ratio_that_reads_as_a_minimum():
    guard = Guard(GuardConfig(), max_steps=1000, detectors=_PlateauAt(300, 250))
    why = "inconclusive: the probe batches disagree (minimum at r 0.000, saddle at r -0.190); 60 products in 9 s"

    def probe(finding: Finding) -> dict:
        return {"kind": "probe", "verdict": "inconclusive", "ratio": 0.000126, "lambda_max": 10.0,
                "lambda_min": 0.00126, "message": why}

    findings = []
    for step in range(1, 301):
        findings += guard.decide(Sample(step=step, loss=2.0), list(range(0, 301, 25)), probe=probe).findings
    assert findings[0].message == f"plateau since 150. Hessian probe: {why}."


def test_a_minimum_triggers_no_rollback_when_recovery_needs_a_saddle():
    _, actions = _run("minimum", needs_saddle=True)
    assert actions == []
    _, actions = _run("saddle", needs_saddle=True)
    assert actions[0].action is ActionKind.ROLLBACK and actions[0].to_step == 150


def test_without_the_gate_any_premature_plateau_rolls_back():
    _, actions = _run("minimum", needs_saddle=False)
    assert actions[0].action is ActionKind.ROLLBACK


def test_a_skipped_probe_does_not_block_recovery():
    findings, actions = _run(None, needs_saddle=True)
    assert findings[0].evidence["probe"] == {"skipped": "lora_b_zero"}
    assert actions[0].action is ActionKind.ROLLBACK


# --- detectors in batches -------------------------------------------------------------------------

def _key(f: Finding) -> tuple:
    return f.reason, f.step, f.onset_step, f.message


def _delivered(guard: Guard, samples: list[Sample]) -> list[tuple[int, Finding]]:
    """(step at which decide returned it, finding) for every detector finding, the last batch included."""
    out = []
    for s in samples:
        out += [(s.step, f) for f in guard.decide(s).findings]
        if s.step % guard.batch_steps == 0:
            assert guard.pending == []
    out += [(samples[-1].step, f) for f in guard.flush()]
    return out


@pytest.mark.parametrize("kind", [*ANOMALY_KINDS, "staircase", "slow"])
def test_batched_detectors_find_exactly_what_step_by_step_finds(kind):
    """The same findings, word for word; each reported at most batch_steps - 1 steps late, a
    non-finite value at once."""
    for seed in range(3):
        curve = make_curve(kind, seed, max_steps=1000)
        per_step = _delivered(Guard(GuardConfig(detection={"batch_steps": 1}, recovery={"enabled": False}),
                                    max_steps=1000), curve.samples)
        batched = _delivered(Guard(GuardConfig(recovery={"enabled": False}), max_steps=1000), curve.samples)
        assert [_key(f) for _, f in batched] == [_key(f) for _, f in per_step]
        assert all(at == f.step for at, f in per_step)
        for at, f in batched:
            late = at - f.step
            assert 0 <= late <= 9
            if f.reason is Reason.NONFINITE:
                assert late == 0
        if kind in ("spike", "divergence_fast", "nonfinite"):
            assert batched, f"{kind} seed {seed}: nothing found, the comparison proves nothing"


def _until_rollback(batch_steps: int, samples: list[Sample], references: References | None = None):
    guard = Guard(GuardConfig(detection={"batch_steps": batch_steps}), max_steps=1000)
    if references is not None:
        guard.set_references(references)
    snapshots: list[int] = [0]
    for s in samples:
        due = s.step % 50 == 0  # the integrations flush before a scheduled snapshot
        decision = guard.decide(s, snapshots, flush=due)
        if decision.rollback_to is not None:
            return guard, decision, s.step
        if due:
            assert guard.pending == []
            snapshots.append(s.step)
    raise AssertionError("no rollback")


@pytest.mark.parametrize("kind,seed", [("spike", 0), ("spike", 1), ("divergence_fast", 0), ("plateau", 2),
                                       ("nonfinite", 0)])
def test_batched_recovery_decides_what_step_by_step_decides(kind, seed):
    """The same trigger, rollback target, LR factor and the level a recovery must get back under
    (the smoothed loss before the finding's own step); only the step it acts at moves, to the
    next multiple of batch_steps (at once for a non-finite loss)."""
    curve = make_curve(kind, seed, max_steps=1000)
    samples = curve.samples
    refs = None
    if kind == "plateau":  # a plateau is acted on at a no-learning level: let its level be one
        onset = curve.labels[0][1]
        refs = References(unigram=float(np.median([s.loss for s in samples if onset <= s.step < onset + 100])))
    g1, d1, at1 = _until_rollback(1, samples, refs)
    g10, d10, at10 = _until_rollback(10, samples, refs)
    assert d10.rollback_to == d1.rollback_to
    assert d10.actions[0].reason == d1.actions[0].reason
    assert d10.actions[0].lr_factor == d1.actions[0].lr_factor
    assert g10.policy.trigger_level == g1.policy.trigger_level
    assert at10 == (at1 if kind == "nonfinite" else -(-at1 // 10) * 10)


def test_a_checkpoint_between_batches_keeps_the_held_back_samples():
    """state_dict carries the samples not yet analysed (through JSON, as on_save writes it): a run
    resumed from it finds what the uninterrupted run finds."""
    samples = make_curve("spike", 0, max_steps=1000).samples
    onset = make_curve("spike", 0, max_steps=1000).labels[0][1]
    cut = onset + 3 if (onset + 3) % 10 else onset + 4  # the spike is held back at the cut
    whole = Guard(GuardConfig(recovery={"enabled": False}), max_steps=1000)
    expected = [_key(f) for _, f in _delivered(whole, samples)]
    first = Guard(GuardConfig(recovery={"enabled": False}), max_steps=1000)
    before = [_key(f) for s in samples[:cut] for f in first.decide(s).findings]
    assert first.pending  # the comparison below is about them
    state = json.loads(json.dumps(first.state_dict()))
    resumed = Guard(GuardConfig(recovery={"enabled": False}), max_steps=1000)
    resumed.load_state_dict(state)
    after = [_key(f) for _, f in _delivered(resumed, samples[cut:])]
    assert before + after == expected
    assert any(k[0] is Reason.SPIKE and k[2] >= onset for k in after)


def _spikes_twice(batch_steps: int) -> list[tuple]:
    rng = random.Random(0)
    guard = Guard(GuardConfig(detection={"batch_steps": batch_steps}), max_steps=2000)
    snapshots, actions = [0], []
    for step in range(1, 400):
        loss = 8.0 if step in (137, 215) else 2.0 - 0.0005 * step + rng.gauss(0, 0.01)
        due = step % 50 == 0
        decision = guard.decide(Sample(step=step, loss=loss, grad_norm=1.0, lr=1e-3), snapshots, flush=due)
        actions += [(a.action.value, a.step, a.reason) for a in decision.actions]
        if not guard.policy.idle(step):
            assert guard.pending == []  # while a recovery is in progress the detectors run every step
        if decision.rollback_to is None and (due or decision.snapshot):
            snapshots.append(step)
    return actions


def test_while_a_recovery_is_in_progress_findings_are_decided_at_their_own_step():
    """A spike in the relapse watch after the LR restore rolls back at its own step, batched or not
    (acting on it at the next multiple of 10 would let 5 more steps train on the spiked weights)."""
    per_step, batched = _spikes_twice(1), _spikes_twice(10)
    # (the slow decay after the first rollback is no relapse: a shape-only plateau is info, not acted on)
    assert [a for a in per_step if a[0] == "rollback"] == [("rollback", 137, "spike"), ("rollback", 215, "relapse")]
    assert [a for a in batched if a[0] == "rollback"] == [("rollback", 140, "spike"), ("rollback", 215, "relapse")]


def test_a_rollback_restores_the_snapshot_memory_and_restarts_the_trend_windows():
    """The detectors come back as the snapshot left them, minus the streaks: the next sample's step
    jumps past the snapshot, so the divergence trend and the plateau segment start afresh while
    the robust baselines (the spike detector's history) are kept."""
    samples = make_curve("spike", 0, max_steps=1000).samples
    guard = Guard(GuardConfig(), max_steps=1000)
    frozen: dict[int, bytes | dict] = {}
    for s in samples:
        due = s.step % 50 == 0
        decision = guard.decide(s, sorted(frozen), flush=due)
        if decision.rollback_to is not None:
            break
        if due:
            frozen[s.step] = guard.frozen_detector_state()
    target = decision.rollback_to
    kept = Guard(GuardConfig(), max_steps=1000)
    kept.load_state_dict({"detectors": pickle.loads(frozen[target])})
    assert len(kept.detectors.divergence.trend) > 0 and kept.detectors.plateau.seg_start is not None
    guard.load_detector_state(frozen[target], target)
    suite = guard.detectors
    assert len(suite.divergence.trend) == 0 and suite.plateau.seg_start is None
    assert list(suite.spike.values) == list(kept.detectors.spike.values) and suite.last_step == target

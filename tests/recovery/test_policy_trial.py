"""The safety net in the state machine: a rollback is a trial, judged at equal compute (pure: no torch)."""

import json
import math

import pytest

from lossguard.config import RecoveryConfig
from lossguard.records import ActionKind, Finding, Reason, Severity
from lossguard.recovery.policy import Phase, RecoveryPolicy
from lossguard.recovery.verdict import Scores

UNITS = 16


def _finding(reason: Reason, step: int, onset: int) -> Finding:
    return Finding(reason, Severity.WARNING, step, onset, f"{reason.value} at {step}")


def _scores(level: float, spread: float = 0.05) -> Scores:
    """UNITS units around ``level``, with a fixed pattern of per-unit differences (the same for every level)."""
    return Scores.of([level + spread * (-1) ** i * (1 + i // 2 % 3) for i in range(UNITS)], [10.0] * UNITS)


def _kinds(decision) -> list[str]:
    return [a.action.value for a in decision.actions]


def _spiked_policy(**cfg) -> tuple[RecoveryPolicy, list[int]]:
    """A policy that has just rolled back from a spike at step 300 to the snapshot of step 200."""
    base = {"smooth_window": 5, "max_low_lr_steps": 40, "relapse_watch_steps": 0, "cooldown_steps": 10}
    pol = RecoveryPolicy(RecoveryConfig(**{**base, **cfg}))
    snaps = [0, 100, 200, 250]
    for step in range(1, 300):
        pol.step(step, 1.0, [], snaps)
    return pol, snaps


def test_a_rollback_starts_a_trial_due_after_as_many_steps_as_it_discarded():
    pol, snaps = _spiked_policy()
    before = pol.state_dict()
    d = pol.step(300, 9.0, [_finding(Reason.SPIKE, 300, 300)], snaps)
    assert d.rollback_to == 200 and d.keep_head and _kinds(d) == ["rollback", "lr_override"]
    assert d.actions[0].details["verdict_step"] == 400
    pol.head_scored(d, _scores(1.0))
    assert pol.judging and "judged against it at step 400" in d.actions[0].message
    assert d.actions[0].details["head_score"] == pytest.approx(1.0)
    assert pol.trial.before["recent"] == before["recent"]  # the state at the moment of rolling back
    assert not pol.verdict_due(399) and pol.verdict_due(400)


def test_a_false_alarm_is_reverted_to_the_head_and_its_reason_triggers_no_more():
    pol, snaps = _spiked_policy()
    recent_at_head = pol.state_dict()["recent"]
    d = pol.step(300, 9.0, [_finding(Reason.SPIKE, 300, 300)], snaps)
    pol.head_scored(d, _scores(1.0))
    for step in range(301, 400):
        pol.step(step, 1.1, [], [0, 100, 200])
    assert pol.phase is Phase.NORMAL  # the low-LR phase ended before the verdict (back under the level)
    d = pol.step(400, 1.1, [], [0, 100, 200, 350], judged=_scores(1.1))
    assert _kinds(d) == ["revert"]
    assert (d.revert_to, d.abandon_after, d.snapshot, d.rollback_to) == (300, 200, True, None)
    revert = d.actions[0]
    assert (revert.from_step, revert.to_step, revert.reason, revert.lr_factor) == (400, 300, "spike", 1.0)
    det = revert.details
    assert det["head_score"] == pytest.approx(1.0) and det["branch_score"] == pytest.approx(1.1)
    assert det["gain"] == pytest.approx(-0.1) and det["false_alarm"] == "spike" and det["equal_compute"]
    assert "no better" in revert.message and "spike findings start no recovery" in revert.message
    # the policy is back where it stood at the head, with the budget spent and a cooldown
    assert pol.phase is Phase.NORMAL and pol.lr_multiplier(401) == 1.0 and pol.rollbacks == 1
    assert pol.state_dict()["recent"] == recent_at_head and pol.trial is None
    assert pol.false_alarms == ["spike"] and pol.verdicts == {"keep": 0, "revert": 1, "decline": 0}
    assert pol.cooldown_until == 410
    # spikes are reported (the findings are the detectors') but start nothing; other reasons still do
    assert pol.step(500, 9.0, [_finding(Reason.SPIKE, 500, 500)], [0, 100, 200, 400]).actions == []
    d = pol.step(501, 9.0, [_finding(Reason.DIVERGENCE, 501, 480)], [0, 100, 200, 400])
    assert d.rollback_to == 200 and d.keep_head


def test_a_genuine_recovery_is_kept_with_both_scores_and_carries_on():
    cfg = RecoveryConfig(smooth_window=5, max_low_lr_steps=300, relapse_watch_steps=0)
    pol = RecoveryPolicy(cfg)
    snaps = [0, 50, 100]
    for step in range(1, 120):
        pol.step(step, 2.9, [], snaps)
    d = pol.step(120, 2.9, [_finding(Reason.EARLY_CONVERGENCE, 120, 10)], snaps)
    assert d.rollback_to == 0 and d.actions[0].details["verdict_step"] == 240
    pol.head_scored(d, _scores(2.9))
    for step in range(121, 240):
        assert pol.step(step, 1.5, [], [0]).actions == []
    d = pol.step(240, 1.5, [], [0], judged=_scores(1.4))
    assert _kinds(d) == ["keep", "lr_restore", "save"]  # the verdict first, then what was due anyway
    keep = d.actions[0]
    assert keep.details["head_score"] == pytest.approx(2.9) and keep.details["branch_score"] == pytest.approx(1.4)
    assert keep.details["gain"] == pytest.approx(1.5) and keep.details["stderr"] == pytest.approx(0.0, abs=1e-12)
    assert (keep.from_step, keep.to_step, keep.reason) == (120, 0, "early_convergence")
    assert "beats the abandoned head's" in keep.message
    assert pol.trial is None and pol.false_alarms == [] and pol.verdicts == {"keep": 1, "revert": 0, "decline": 0}
    assert d.revert_to is None


def test_a_gain_within_the_noise_is_reverted():
    pol, snaps = _spiked_policy(judge_z=2.0)
    d = pol.step(300, 9.0, [_finding(Reason.SPIKE, 300, 300)], snaps)
    head = Scores.of([1.0 + 0.3 * (-1) ** i for i in range(UNITS)], [10.0] * UNITS)
    pol.head_scored(d, head)
    for step in range(301, 400):
        pol.step(step, 1.0, [], [0, 100, 200])
    # better by 0.01 on average, with per-unit differences of +-0.2: far within the noise
    branch = Scores.of([h - 0.01 + 0.2 * (-1) ** (i // 2) for i, h in enumerate(head.losses)], head.weights)
    d = pol.step(400, 1.0, [], [0, 100, 200], judged=branch)
    assert _kinds(d) == ["revert"] and "within the evaluation noise" in d.actions[0].message


def test_no_trial_without_scores_or_with_a_broken_head_or_when_switched_off():
    pol, snaps = _spiked_policy()
    d = pol.step(300, 9.0, [_finding(Reason.SPIKE, 300, 300)], snaps)
    pol.head_scored(d, None, "no evaluation batches were kept")
    assert not d.keep_head and pol.trial is None
    assert d.actions[0].details["safety_net"] == "off for this rollback: no evaluation batches were kept"
    assert "verdict_step" not in d.actions[0].details

    pol, snaps = _spiked_policy()
    d = pol.step(300, math.nan, [_finding(Reason.NONFINITE, 300, 300)], snaps)
    pol.head_scored(d, Scores.of([math.nan] * UNITS, [10.0] * UNITS))
    assert not d.keep_head and pol.trial is None and "nothing to go back to" in d.actions[0].details["safety_net"]

    pol, snaps = _spiked_policy()
    d = pol.step(300, 9.0, [_finding(Reason.SPIKE, 300, 300)], snaps)
    pol.head_scored(d, Scores.of([1.0], [10.0]))
    assert pol.trial is None and "too few" in d.actions[0].details["safety_net"]

    pol, snaps = _spiked_policy(safety_net=False)
    d = pol.step(300, 9.0, [_finding(Reason.SPIKE, 300, 300)], snaps)
    assert not d.keep_head and pol.trial is None and "verdict_step" not in d.actions[0].details


def test_a_rollback_inside_the_branch_moves_the_verdict_and_a_revert_goes_to_the_first_head():
    pol, snaps = _spiked_policy(max_low_lr_steps=10)
    d = pol.step(300, 9.0, [_finding(Reason.SPIKE, 300, 300)], snaps)
    pol.head_scored(d, _scores(1.0))
    for step in range(301, 320):
        pol.step(step, 1.0, [], [0, 100, 200])
    d = pol.step(320, math.nan, [_finding(Reason.NONFINITE, 320, 320)], [0, 100, 200, 310])
    assert d.rollback_to == 200 and not d.keep_head  # one head: the branch's states are on trial
    assert d.actions[0].details["safety_net"] == "inside the branch under trial"
    assert pol.trial.due_step == 520 and d.actions[0].details["verdict_step"] == 520
    assert not pol.verdict_due(519)
    for step in range(321, 520):
        pol.step(step, 1.2, [], [0, 100, 200])
    d = pol.step(520, 1.2, [], [0, 100, 200], judged=_scores(1.2))
    assert _kinds(d) == ["revert"] and d.revert_to == 300 and d.abandon_after == 200
    assert pol.false_alarms == ["spike"] and pol.rollbacks == 2


def test_a_reverted_nan_rollback_is_not_a_false_alarm():
    """A NaN loss whose step an AMP scaler skipped leaves the weights finite: the rollback can be
    useless, and is reverted, but non-finite losses must keep triggering recovery."""
    pol, snaps = _spiked_policy()
    d = pol.step(300, math.nan, [_finding(Reason.NONFINITE, 300, 300)], snaps)
    pol.head_scored(d, _scores(1.0))
    for step in range(301, 400):
        pol.step(step, 1.0, [], [0, 100, 200])
    d = pol.step(400, 1.0, [], [0, 100, 200], judged=_scores(1.0))
    assert _kinds(d) == ["revert"] and d.actions[0].details["false_alarm"] is None
    assert pol.false_alarms == []
    d = pol.step(405, math.nan, [_finding(Reason.NONFINITE, 405, 405)], [0, 100, 200, 400])
    assert pol.cooldown_until > 405 and d.rollback_to == 200  # still acted on at once, cooldown or not


def test_a_relapse_rollback_is_judged_the_same_way():
    cfg = RecoveryConfig(smooth_window=5, max_low_lr_steps=20, relapse_watch_steps=50, relapse_fraction=0.5)
    pol = RecoveryPolicy(cfg)
    for step in range(1, 120):
        pol.step(step, 2.9, [], [0, 25])
    d = pol.step(120, 2.9, [_finding(Reason.EARLY_CONVERGENCE, 120, 60)], [0, 25, 50, 75, 100])
    assert d.rollback_to == 0  # 120 steps discarded: the verdict is due at 240
    pol.head_scored(d, _scores(2.9))
    for step in range(121, 141):
        pol.step(step, 1.0, [], [0])
    assert pol.restore_step == 140
    relapse = None
    for step in range(141, 200):
        relapse = pol.step(step, 2.9 if step > 150 else 1.0, [], [0, 140])
        if relapse.actions:
            break
    assert relapse.rollback_to == 140 and relapse.findings[0].reason is Reason.RELAPSE
    assert not relapse.keep_head  # inside the first trial's branch: that trial waits longer
    assert pol.trial.reason == "early_convergence" and pol.trial.due_step == 240 + (step - 140)
    due = pol.trial.due_step
    for s in range(step + 1, due):
        pol.step(s, 1.0, [], [0, 140])
    d = pol.step(due, 1.0, [], [0, 140], judged=_scores(1.0))
    assert _kinds(d) == ["keep"]
    # a relapse with no trial running starts its own; reverting it stops relapse rollbacks
    pol2 = RecoveryPolicy(cfg)
    pol2.restore_step, pol2.restore_level, pol2.trigger_level = 140, 1.0, 2.9
    pol2.watch_until, pol2.watch_level, pol2.rollbacks = 190, True, 1
    for s in range(141, 150):
        pol2.step(s, 1.0, [], [0, 140])
    d = pol2.step(150, 2.9, [_finding(Reason.SPIKE, 150, 150)], [0, 140])
    assert d.rollback_to == 140 and d.keep_head and d.actions[0].reason == "relapse"
    assert d.actions[0].details["verdict_step"] == 160
    pol2.head_scored(d, _scores(1.0))
    for s in range(151, 160):
        pol2.step(s, 1.0, [], [0, 140])
    d = pol2.step(160, 1.0, [], [0, 140], judged=_scores(1.3))
    assert _kinds(d) == ["revert"] and pol2.false_alarms == ["relapse"]
    assert pol2.ceiling == 1.0 and pol2.lr_multiplier(161) == 1.0  # the relapse's LR cut is undone
    assert pol2.watch_until == -1


def test_at_train_end_a_trial_not_yet_due_is_judged_on_what_there_is():
    pol, snaps = _spiked_policy()
    d = pol.step(300, 9.0, [_finding(Reason.SPIKE, 300, 300)], snaps)
    pol.head_scored(d, _scores(1.0))
    for step in range(301, 350):
        pol.step(step, 1.2, [], [0, 100, 200])
    d = pol.conclude(350, _scores(1.2))
    assert _kinds(d) == ["revert"] and d.revert_to == 300
    assert "before equal compute (training ended)" in d.actions[0].message
    assert d.actions[0].details["equal_compute"] is False
    assert pol.conclude(351, _scores(1.0)).actions == []  # nothing left to judge


def test_state_dict_round_trip_mid_trial_and_after_a_revert():
    pol, snaps = _spiked_policy()
    d = pol.step(300, 9.0, [_finding(Reason.SPIKE, 300, 300)], snaps)
    pol.head_scored(d, _scores(1.0))
    for step in range(301, 350):
        pol.step(step, 1.2, [], [0, 100, 200])
    state = json.loads(json.dumps(pol.state_dict(), allow_nan=False))
    clone = RecoveryPolicy(pol.config)
    clone.load_state_dict(state)
    assert clone.state_dict() == pol.state_dict() and clone.judging and clone.trial.head == pol.trial.head
    for step in range(350, 400):
        a, b = pol.step(step, 1.2, [], [0, 100, 200]), clone.step(step, 1.2, [], [0, 100, 200])
        assert [x.to_record() for x in a.actions] == [x.to_record() for x in b.actions]
    a = pol.step(400, 1.2, [], [0, 100, 200], judged=_scores(1.2))
    b = clone.step(400, 1.2, [], [0, 100, 200], judged=_scores(1.2))
    assert [x.to_record() for x in a.actions] == [x.to_record() for x in b.actions]
    assert a.actions[0].action is ActionKind.REVERT
    again = RecoveryPolicy(pol.config)
    again.load_state_dict(json.loads(json.dumps(pol.state_dict(), allow_nan=False)))
    assert again.false_alarms == ["spike"] and again.verdicts == {"keep": 0, "revert": 1, "decline": 0} and again.trial is None
    # a state saved before the safety net existed loads with none of it
    old = {k: v for k, v in pol.state_dict().items() if k not in ("trial", "false_alarms", "verdicts")}
    legacy = RecoveryPolicy(pol.config)
    legacy.load_state_dict(old)
    assert legacy.trial is None and legacy.false_alarms == [] and legacy.verdicts == {"keep": 0, "revert": 0, "decline": 0}

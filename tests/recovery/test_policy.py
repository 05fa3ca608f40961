"""The recovery state machine on scripted loss streams and findings (pure: no torch, no Trainer)."""

import math
import subprocess
import sys

import pytest

from lossguard.config import RecoveryConfig
from lossguard.records import ActionKind, Finding, Reason, Severity
from lossguard.recovery.policy import Phase, RecoveryPolicy, pick_target


def _finding(reason: Reason, step: int, onset: int) -> Finding:
    return Finding(reason, Severity.WARNING, step, onset, f"{reason.value} at {step}")


def _kinds(decision) -> list[str]:
    return [a.action.value for a in decision.actions]


def test_target_is_rollback_steps_before_the_onset_not_the_detection():
    snaps = list(range(0, 401, 25))
    assert pick_target(snaps, onset=250, rollback_steps=100, detected=400) == 150
    assert pick_target(snaps, onset=260, rollback_steps=100, detected=400) == 150
    # the trouble began too early for a full distance: the oldest snapshot before the detection
    assert pick_target([0, 25, 50], onset=30, rollback_steps=100, detected=60) == 0
    assert pick_target([200], onset=150, rollback_steps=100, detected=200) is None
    assert pick_target([], onset=150, rollback_steps=100, detected=200) is None


def test_full_cycle_rollback_low_lr_restore_and_multipliers():
    cfg = RecoveryConfig(rollback_steps=100, lr_factor=0.1, max_low_lr_steps=300, smooth_window=5,
                         restore_ramp_steps=4, relapse_watch_steps=0)
    pol = RecoveryPolicy(cfg)
    snaps = list(range(0, 301, 25))
    for step in range(1, 300):
        assert pol.step(step, 2.0, [], snaps).actions == []
    assert pol.lr_multiplier(300) == 1.0
    d = pol.step(300, 2.9, [_finding(Reason.EARLY_CONVERGENCE, 300, 220)], snaps)
    assert _kinds(d) == ["rollback", "lr_override"]
    assert d.rollback_to == 100 and d.save
    rb = d.actions[0]
    assert (rb.from_step, rb.to_step, rb.lr_factor, rb.reason) == (300, 100, 0.1, "early_convergence")
    assert rb.details["data_replayed"] is False and "data loader keeps moving" in rb.message
    assert pol.phase is Phase.LOW_LR and pol.lr_multiplier(301) == 0.1
    assert pol.trigger_level == pytest.approx(2.0)
    # below the trigger level, but not yet past the detection step (200 replayed steps needed)
    for step in range(301, 500):
        assert pol.step(step, 1.5, [], snaps).actions == []
    d = pol.step(500, 1.5, [], snaps)
    assert _kinds(d) == ["lr_restore", "save"] and d.snapshot and d.save
    assert pol.phase is Phase.RAMP
    assert [pol.lr_multiplier(s) for s in (500, 501, 502, 504, 510)] == pytest.approx(
        [0.1, 0.1 + 0.9 / 4, 0.1 + 0.9 / 2, 1.0, 1.0])
    for step in range(501, 505):
        pol.step(step, 1.5, [], snaps)
    assert pol.phase is Phase.NORMAL and pol.lr_multiplier(505) == 1.0


def test_low_lr_ends_after_max_low_lr_steps_when_the_loss_never_improves():
    pol = RecoveryPolicy(RecoveryConfig(max_low_lr_steps=50, smooth_window=5))
    pol.step(10, 2.0, [], [0])
    d = pol.step(120, 2.0, [_finding(Reason.SPIKE, 120, 120)], [0, 100])
    assert d.rollback_to == 0  # nothing 100 steps before the onset: the oldest snapshot
    for step in range(121, 170):
        assert pol.step(step, 5.0, [], [0]).actions == []
    d = pol.step(170, 5.0, [], [0])
    assert _kinds(d) == ["lr_restore", "save"] and "50 steps at the reduced LR passed" in d.actions[0].message


def test_cooldown_escalation_and_give_up_after_max_rollbacks():
    cfg = RecoveryConfig(max_rollbacks=2, cooldown_steps=10, max_low_lr_steps=5, lr_factor=0.2, escalation=0.5,
                         smooth_window=2, relapse_watch_steps=0)
    pol = RecoveryPolicy(cfg)
    snaps = [0, 25, 50, 75, 100, 125, 150, 175, 200]
    spike = _finding(Reason.SPIKE, 200, 200)
    d = pol.step(200, 9.0, [spike], snaps)
    assert d.rollback_to == 100 and pol.factor == 0.2
    # within cooldown and low-LR: a spike is ignored, a NaN is not
    assert pol.step(201, 9.0, [_finding(Reason.SPIKE, 201, 201)], snaps).actions == []
    d = pol.step(202, math.nan, [_finding(Reason.NONFINITE, 202, 202)], snaps)
    assert d.rollback_to == 100 and pol.factor == pytest.approx(0.1)  # escalated
    assert pol.cooldown_until == 202 + 20  # cooldown doubles
    d = pol.step(203, math.nan, [_finding(Reason.NONFINITE, 203, 203)], snaps)
    assert _kinds(d) == ["give_up"] and d.rollback_to is None and not d.stop
    assert d.findings[0].reason is Reason.GAVE_UP and d.findings[0].severity is Severity.CRITICAL
    assert pol.phase is Phase.GAVE_UP
    assert pol.step(300, math.nan, [_finding(Reason.NONFINITE, 300, 300)], snaps).actions == []  # never loops


def test_give_up_can_stop_training_and_untriggered_reasons_are_ignored():
    pol = RecoveryPolicy(RecoveryConfig(max_rollbacks=0, on_give_up="stop", triggers=("nonfinite",)))
    assert pol.step(5, 3.0, [_finding(Reason.SPIKE, 5, 5)], [0]).actions == []
    d = pol.step(6, math.nan, [_finding(Reason.NONFINITE, 6, 6)], [0])
    assert d.stop and _kinds(d) == ["give_up"]


def test_relapse_after_restore_rolls_back_to_the_recovered_state_and_lowers_the_lr():
    cfg = RecoveryConfig(smooth_window=5, max_low_lr_steps=20, relapse_watch_steps=50, relapse_fraction=0.5,
                         relapse_lr_scale=0.3)
    pol = RecoveryPolicy(cfg)
    for step in range(1, 120):
        pol.step(step, 2.9, [], [0, 25])
    pol.step(120, 2.9, [_finding(Reason.EARLY_CONVERGENCE, 120, 60)], [0, 25, 50, 75, 100])
    restore = None
    for step in range(121, 200):
        d = pol.step(step, 1.0, [], [0])
        if d.actions:
            restore = step
            break
    assert restore == 140 and pol.restore_level == pytest.approx(1.0)
    snaps = [0, restore]
    d = None
    for step in range(restore + 1, restore + 30):
        d = pol.step(step, 2.9, [], snaps)
        if d.actions:
            break
    assert d is not None and _kinds(d) == ["rollback", "lr_override"]
    assert d.rollback_to == restore and d.findings[0].reason is Reason.RELAPSE
    assert "too high" in d.findings[0].message
    # the console prints the reason before the message: the word once, not "relapse relapse:"
    from lossguard.presentation.console import finding_line
    assert finding_line(d.findings[0]).count("relapse") == 1
    assert d.findings[0].message.startswith("smoothed loss rose from ")
    assert pol.ceiling == pytest.approx(0.3) and pol.lr_multiplier(step + 1) == pytest.approx(0.3)
    assert pol.rollbacks == 2


def test_a_spike_right_after_restore_counts_as_relapse():
    pol = RecoveryPolicy(RecoveryConfig(smooth_window=3, max_low_lr_steps=10, relapse_watch_steps=40))
    for step in range(1, 50):
        pol.step(step, 2.0, [], [0])
    pol.step(50, 2.0, [_finding(Reason.DIVERGENCE, 50, 50)], [0, 25])
    for step in range(51, 61):
        d = pol.step(step, 1.0, [], [0])
    assert pol.phase is Phase.NORMAL and pol.restore_step == 60
    d = pol.step(62, 4.0, [_finding(Reason.SPIKE, 62, 62)], [0, 60])
    assert d.rollback_to == 60 and d.findings[0].reason is Reason.RELAPSE and pol.ceiling < 1.0


def test_events_end_the_low_lr_phase_at_the_pre_event_level():
    pol = RecoveryPolicy(RecoveryConfig(smooth_window=5, max_low_lr_steps=300, relapse_watch_steps=100))
    for step in range(1, 200):
        pol.step(step, 1.0, [], [0, 100])
    d = pol.step(200, 9.0, [_finding(Reason.SPIKE, 200, 200)], [0, 100])
    assert d.rollback_to == 100 and pol.trigger_level == pytest.approx(1.0)
    for step in range(201, 205):
        assert pol.step(step, 1.2, [], [0]).actions == []
    restored = [pol.step(step, 0.9, [], [0]).actions for step in range(205, 215)]
    first = next(i for i, acts in enumerate(restored) if acts)
    assert first + 205 == 208  # mean of the last 5 (1.2, 0.9, 0.9, 0.9, 0.9) = 0.96 < 1.0; no 100-step replay
    assert [a.action.value for a in restored[first]] == ["lr_restore", "save"]
    assert not pol.watch_level  # a higher loss after an event is not read as a relapse...
    for step in range(209, 230):
        assert pol.step(step, 1.5, [], [0, 208]).actions == []
    d = pol.step(230, 9.0, [_finding(Reason.DIVERGENCE, 230, 215)], [0, 208])
    assert d.rollback_to == 208 and d.findings[0].reason is Reason.RELAPSE  # ...but new trouble soon after is


def test_state_dict_round_trip_mid_recovery():
    cfg = RecoveryConfig(smooth_window=4)
    pol = RecoveryPolicy(cfg)
    for step in range(1, 30):
        pol.step(step, 2.0 + step * 0.01, [], [0])
    pol.step(30, math.nan, [_finding(Reason.NONFINITE, 30, 30)], [0])
    pol.step(31, 2.5, [], [0])
    state = pol.state_dict()
    import json

    clone = RecoveryPolicy(cfg)
    clone.load_state_dict(json.loads(json.dumps(state)))
    assert clone.state_dict() == state
    assert clone.phase is Phase.LOW_LR and clone.lr_multiplier(32) == pol.lr_multiplier(32)
    for step in range(32, 400):
        a, b = pol.step(step, 1.0, [], [0]), clone.step(step, 1.0, [], [0])
        assert [x.to_record() for x in a.actions] == [x.to_record() for x in b.actions]


def test_the_policy_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; "
            "from lossguard.recovery.policy import RecoveryPolicy; import lossguard.guard; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_actions_are_telemetry_records():
    pol = RecoveryPolicy()
    d = pol.step(300, 3.0, [_finding(Reason.SPIKE, 300, 290)], [0, 100, 175])
    rec = d.actions[0].to_record()
    assert rec["kind"] == "action" and rec["action"] == ActionKind.ROLLBACK.value
    assert {k: rec[k] for k in ("step", "from_step", "to_step", "lr_factor", "reason")} == {
        "step": 300, "from_step": 300, "to_step": 175, "lr_factor": 0.1, "reason": "spike"}


def test_a_relapse_after_a_resume_without_an_older_snapshot_says_why_and_still_lowers_the_lr():
    """Resumed after the LR was restored, the run holds snapshots from its resume step on only:
    no rollback target at or before the restore step. It used to do nothing, silently."""
    cfg = RecoveryConfig(smooth_window=5, max_low_lr_steps=20, relapse_watch_steps=50, relapse_fraction=0.5,
                         relapse_lr_scale=0.3)
    pol = RecoveryPolicy(cfg)
    for step in range(1, 120):
        pol.step(step, 2.9, [], [0, 25])
    pol.step(120, 2.9, [_finding(Reason.EARLY_CONVERGENCE, 120, 60)], [0, 25, 50, 75, 100])
    for step in range(121, 141):
        pol.step(step, 1.0, [], [0])
    assert pol.restore_step == 140
    resumed = RecoveryPolicy(cfg)
    resumed.load_state_dict(pol.state_dict())  # a checkpoint of step 145, resumed
    for step in range(141, 146):
        resumed.step(step, 1.0, [], [145])
    d = None
    for step in range(146, 175):
        d = resumed.step(step, 2.9, [], [145])
        if d.actions:
            break
    assert d is not None and d.findings[0].reason is Reason.RELAPSE and d.rollback_to is None
    assert _kinds(d) == ["lr_override"]
    assert "no snapshot at or before the post-recovery step 140" in d.actions[0].message
    assert "oldest snapshot held is of step 145" in d.actions[0].message
    assert resumed.ceiling == pytest.approx(0.3) and resumed.lr_multiplier(step + 1) == pytest.approx(0.3)
    assert resumed.rollbacks == 1  # no rollback was spent

"""Looking before rolling back: the head against the snapshot at the trouble's onset (pure: no torch)."""

import math

import pytest

from lossguard.config import RecoveryConfig
from lossguard.records import ActionKind, Finding, Reason, Severity
from lossguard.recovery.policy import Phase, RecoveryPolicy, check_target
from lossguard.recovery.verdict import Scores

UNITS = 16


def _scores(level: float, spread: float = 0.05) -> Scores:
    return Scores.of([level + spread * (-1) ** i * (1 + i // 2 % 3) for i in range(UNITS)], [10.0] * UNITS)


def _policy(**cfg) -> tuple[RecoveryPolicy, list[int]]:
    base = {"smooth_window": 5, "max_low_lr_steps": 40, "relapse_watch_steps": 0, "cooldown_steps": 10}
    pol = RecoveryPolicy(RecoveryConfig(**{**base, **cfg}))
    snaps = [0, 100, 200, 250]
    for step in range(1, 300):
        pol.step(step, 1.0, [], snaps)
    return pol, snaps


def test_the_compared_snapshot_is_before_damage_and_inside_a_plateau():
    snaps = [0, 50, 100, 150, 200]
    # damage (a divergence from 120): the state before it began
    assert check_target(snaps, 120, 210, plateau=False) == 100
    assert check_target(snaps, 100, 210, plateau=False) == 100
    # a plateau from 120: its first snapshot, the loss the run claims not to have improved on since
    assert check_target(snaps, 120, 210, plateau=True) == 150
    # a plateau found before any snapshot inside it: the last one before its onset
    assert check_target([0, 50, 100], 120, 130, plateau=True) == 100
    # nothing before the onset of damage: no comparison
    assert check_target([50, 100], 20, 130, plateau=False) is None
    # a snapshot taken at the detection step itself is never compared
    assert check_target([0, 100, 130], 120, 130, plateau=True) == 100


def test_a_head_clearly_better_than_the_onset_declines_the_rollback_and_keeps_the_state():
    pol, snaps = _policy()
    before = pol.state_dict()
    finding = Finding(Reason.DIVERGENCE, Severity.CRITICAL, 300, 260, "divergence at 300")
    d = pol.step(300, 1.0, [finding], snaps)
    assert d.rollback_to == 100 and d.check_step == 250 and d.keep_head  # target 100 steps before 260
    pol.head_scored(d, _scores(0.8))
    go_on = pol.checked(300, d, _scores(1.0))  # the state at the onset was worse: no damage on held-out data
    assert go_on is False
    assert [a.action for a in d.actions] == [ActionKind.DECLINE]
    assert (d.rollback_to, d.keep_head, d.save, d.drop_head, d.check_step) == (None, False, False, True, None)
    decline = d.actions[0]
    assert decline.details["check_step"] == 250 and decline.details["target_step"] == 100
    assert decline.details["gain"] == pytest.approx(0.2) and decline.details["gain"] > decline.details["threshold"]
    assert "no step lost" in decline.message
    # the finding is reported, not acted on; the policy stands where it stood, with a cooldown
    assert finding.severity is Severity.INFO and finding.evidence["confidence"] == "contradicted"
    assert "not acted on" in finding.message
    assert pol.trial is None and pol.phase is Phase.NORMAL and pol.rollbacks == 0 and pol.lr_multiplier(301) == 1.0
    assert pol.state_dict()["recent"] == before["recent"] and pol.false_alarms == []
    assert pol.verdicts["decline"] == 1 and not pol.idle(305) and pol.idle(310)


def test_a_head_no_better_than_the_onset_goes_on_with_the_trial():
    pol, snaps = _policy()
    finding = Finding(Reason.DIVERGENCE, Severity.CRITICAL, 300, 260, "divergence at 300")
    d = pol.step(300, 1.0, [finding], snaps)
    pol.head_scored(d, _scores(1.2))
    assert pol.checked(300, d, _scores(1.0)) is True
    assert d.rollback_to == 100 and pol.judging and pol.phase is Phase.LOW_LR
    assert [a.action for a in d.actions] == [ActionKind.ROLLBACK, ActionKind.LR_OVERRIDE]
    assert d.actions[0].details["precheck"]["gain"] == pytest.approx(-0.2)
    assert finding.severity is Severity.CRITICAL


def test_a_gain_within_the_noise_goes_on():
    pol, snaps = _policy()
    d = pol.step(300, 1.0, [Finding(Reason.SPIKE, Severity.WARNING, 300, 300, "spike")], snaps)
    pol.head_scored(d, _scores(1.0, spread=0.5))
    # 0.01 better on average, units scattered by +-0.5 around their own means: indistinguishable
    assert pol.checked(300, d, Scores.of([v + 0.01 + 0.2 * (-1) ** i for i, v in enumerate(_scores(1.0, 0.5).losses)],
                                         [10.0] * UNITS)) is True


def test_a_plateau_needs_a_real_gain_and_to_be_below_its_no_learning_level():
    pol, snaps = _policy()
    ev = {"reference": "unigram", "reference_level": 1.0, "reference_tolerance": 0.1}
    finding = Finding(Reason.EARLY_CONVERGENCE, Severity.WARNING, 300, 220, "plateau", evidence=dict(ev))
    d = pol.step(300, 1.0, [finding], snaps)
    assert d.check_step == 250  # the first snapshot inside the plateau
    pol.head_scored(d, _scores(0.95))
    # fell from 1.05 to 0.95: clearly, but only *to* the unigram level (0.9 with its tolerance): stands
    assert pol.checked(300, d, _scores(1.05)) is True and d.actions[0].details["precheck"]["level"] == pytest.approx(0.9)

    pol, snaps = _policy()
    finding = Finding(Reason.EARLY_CONVERGENCE, Severity.WARNING, 300, 220, "plateau", evidence=dict(ev))
    d = pol.step(300, 1.0, [finding], snaps)
    pol.head_scored(d, _scores(0.70))
    # well below the level and 0.1 better than inside the plateau (> 3% of the loss): declined
    assert pol.checked(300, d, _scores(0.80)) is False and finding.severity is Severity.INFO

    pol, snaps = _policy()
    finding = Finding(Reason.EARLY_CONVERGENCE, Severity.WARNING, 300, 220, "plateau", evidence=dict(ev))
    d = pol.step(300, 1.0, [finding], snaps)
    pol.head_scored(d, _scores(0.70, spread=0.0))
    # a gain far above the (zero) noise but under 3% of the loss: a plateau still
    assert pol.checked(300, d, _scores(0.71, spread=0.0)) is True


def test_a_non_finite_loss_is_never_checked_and_an_unscored_snapshot_goes_on():
    pol, snaps = _policy()
    d = pol.step(300, math.nan, [Finding(Reason.NONFINITE, Severity.CRITICAL, 300, 300, "nan")], snaps)
    assert d.rollback_to is not None and d.check_step is None

    pol, snaps = _policy()
    d = pol.step(300, 1.0, [Finding(Reason.SPIKE, Severity.WARNING, 300, 300, "spike")], snaps)
    pol.head_scored(d, _scores(1.0))
    assert pol.checked(300, d, None) is True and "could not be scored" in d.actions[0].details["precheck"]

    pol, snaps = _policy(precheck=False)
    d = pol.step(300, 1.0, [Finding(Reason.SPIKE, Severity.WARNING, 300, 300, "spike")], snaps)
    assert d.keep_head and d.check_step is None


def test_a_declined_reason_triggers_again_after_the_cooldown():
    pol, snaps = _policy()
    d = pol.step(300, 1.0, [Finding(Reason.SPIKE, Severity.WARNING, 300, 290, "spike")], snaps)
    pol.head_scored(d, _scores(0.8))
    assert pol.checked(300, d, _scores(1.0)) is False
    for step in range(301, 320):
        pol.step(step, 1.0, [], snaps)
    d = pol.step(320, 9.0, [Finding(Reason.SPIKE, Severity.WARNING, 320, 320, "spike")], snaps)
    assert d.rollback_to == 200 and d.check_step == 250  # not a false alarm for the rest of the run

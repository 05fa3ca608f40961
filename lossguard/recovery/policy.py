"""The recovery decision, as a pure state machine: NORMAL -> ROLLBACK -> LOW_LR -> RESTORE -> NORMAL.

Given each step's loss, the findings the detectors raised and the steps that have snapshots,
``RecoveryPolicy.step`` returns a ``Decision``: what to roll back to, which LR multiplier to use,
when to save, when to give up. It never touches training; ``recovery/apply.py`` and the
integrations carry the decision out. Stdlib only.

The safety net: a rollback is a ``Trial``. The integration keeps the abandoned branch's head and
its score on the judge's fixed evaluation sequences (``head_scored``); once the recovered branch
has trained as many steps as were discarded, it is scored on the same sequences (``step(...,
judged=...)``) and ``verdict.judge`` keeps it or reverts to the head. A reverted trigger is a
false alarm: its reason starts no recovery for the rest of the run.

Before a judged rollback is carried out, the policy looks first (``recovery.precheck``): the
integration loads the weights of the snapshot at the trouble's onset (``Decision.check_step``),
scores them on the same sequences, and ``checked`` compares them with the head. A head clearly
better than the onset (by more than ``judge_z`` standard errors, and for a plateau by at least
``precheck_plateau_gain`` of the loss) contradicts the finding: the run has improved on held-out
sequences since the trouble began. The rollback is then declined: the head is put back bitwise,
no step is lost, and the finding becomes ``info``.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lossguard.config import RecoveryConfig
from lossguard.numbers import fmt as _fmt
from lossguard.records import Action, ActionKind, Finding, Reason, Severity, as_reason
from lossguard.recovery.verdict import Scores, Verdict, judge, paired_gain


class Phase(str, enum.Enum):
    """Where recovery stands. ROLLBACK and RESTORE are moments (actions), not phases."""

    NORMAL = "normal"
    LOW_LR = "low_lr"
    RAMP = "ramp"
    GAVE_UP = "gave_up"


@dataclass
class Decision:
    """What the integration must do after this step.

    ``keep_head``: before rolling back, keep the current state (the abandoned branch's head) and
    score it (``RecoveryPolicy.head_scored``). ``check_step``: then load that snapshot's weights,
    score them and pass the scores to ``RecoveryPolicy.checked``, which says whether to go on. ``revert_to``: put back the head kept at that step,
    and forget the snapshots the rejected branch took after ``abandon_after``. ``drop_head``: the
    recovery was kept, the head is no longer needed.
    """

    actions: list[Action] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    rollback_to: int | None = None
    snapshot: bool = False
    save: bool = False
    stop: bool = False
    keep_head: bool = False
    revert_to: int | None = None
    abandon_after: int | None = None
    drop_head: bool = False
    check_step: int | None = None


@dataclass
class Trial:
    """A rollback under judgement: the abandoned head, its score, and when the verdict is due.

    ``due_step`` is the step at which the recovered branch has trained as many steps as were
    discarded (a nested rollback inside the branch moves it by the steps that one discarded).
    ``before`` is the policy's own state at the moment of rolling back, put back on a revert.
    """

    reason: str
    head_step: int
    target_step: int
    due_step: int
    before: dict[str, Any]
    head: Scores | None = None
    finding: Finding | None = None  # the trigger, while the rollback can still be declined (not saved)

    def to_record(self) -> dict[str, Any]:
        return {"reason": self.reason, "head_step": self.head_step, "target_step": self.target_step,
                "due_step": self.due_step, "before": self.before,
                "head": None if self.head is None else self.head.to_record()}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Trial:
        head = rec.get("head")
        return cls(str(rec["reason"]), int(rec["head_step"]), int(rec["target_step"]), int(rec["due_step"]),
                   dict(rec["before"]), None if head is None else Scores.from_record(head))


def pick_target(snapshots: Sequence[int], onset: int, rollback_steps: int, detected: int) -> int | None:
    """The newest snapshot at least ``rollback_steps`` before ``onset``.

    When none is that old (the trouble began early in the run), the oldest snapshot taken before
    the detection; None when there is no snapshot to go back to.
    """
    before = [s for s in snapshots if s < detected]
    if not before:
        return None
    eligible = [s for s in before if s <= onset - rollback_steps]
    return max(eligible) if eligible else min(before)


def _level(finding: Finding | None) -> float | None:
    """The held-out loss a plateau found at a no-learning level must get under to be contradicted:
    that level less its tolerance; None for a plateau not judged against one."""
    ev = finding.evidence if finding is not None else {}
    try:
        return float(ev["reference_level"]) * (1.0 - float(ev.get("reference_tolerance", 0.0)))
    except (KeyError, TypeError, ValueError):
        return None


def check_target(snapshots: Sequence[int], onset: int, detected: int, *, plateau: bool) -> int | None:
    """The snapshot whose held-out loss the head is compared with before a rollback.

    For trouble that does damage (a divergence, a spike, a relapse): the last snapshot taken at or
    before ``onset``, the state before the damage. For a plateau, which claims no progress since
    it began: the first one taken at or after ``onset`` (before ``detected``), else the last one
    before it. None when there is none such."""
    before = [s for s in snapshots if s < detected]
    earlier = [s for s in before if s <= onset]
    if plateau:
        after = [s for s in before if s >= onset]
        if after:
            return min(after)
    return max(earlier) if earlier else None


_PRIORITY = {Reason.NONFINITE: 0, Reason.DIVERGENCE: 1, Reason.LR_TOO_HIGH: 1, Reason.SPIKE: 2,
             Reason.EARLY_CONVERGENCE: 3}
# trouble of the trajectory (the LR may be too high: watch for a relapse after the restore), as
# opposed to events (a bad batch, an overflow) that the rollback itself undoes
_TRAJECTORY = frozenset({Reason.EARLY_CONVERGENCE.value, Reason.DIVERGENCE.value, Reason.LR_TOO_HIGH.value})


class RecoveryPolicy:
    """Decides rollbacks, the reduced-LR phase, the LR restore, relapses and giving up.

    Budgets keep it from looping: a cooldown between rollbacks (doubling after each), at most
    ``max_rollbacks`` rollbacks, and each rollback's LR factor ``escalation`` times the
    previous one. A non-finite loss is acted on at once, cooldown or not (the weights are
    already lost); other triggers wait out the cooldown and any recovery in progress.
    """

    def __init__(self, config: RecoveryConfig | None = None, *, lookback: int = 1) -> None:
        self.config = config or RecoveryConfig()
        self.phase = Phase.NORMAL
        self.rollbacks = 0
        self.factor = self.config.lr_factor
        self.ceiling = 1.0
        self.cooldown_until = -1
        self.trigger_level = math.inf
        self.trigger_reason: str | None = None
        self.detected_step = -1
        self.target_step = -1
        self.low_until_min = -1
        self.low_deadline = -1
        self.ramp_start = -1
        self.restore_step = -1
        self.restore_level = math.nan
        self.watch_until = -1
        self.watch_level = False
        self.trial: Trial | None = None
        self.false_alarms: list[str] = []  # reasons whose rollback was reverted: they trigger nothing now
        self.verdicts: dict[str, int] = {"keep": 0, "revert": 0, "decline": 0}
        # (step, loss) of the last finite losses: the smoothing window and the ``lookback`` steps
        # after it. Findings reach the policy up to ``lookback`` steps late (the detectors run in
        # batches), and the level a recovery must get back under is the one from before the
        # finding's own step
        self._recent: deque[tuple[int, float]] = deque(maxlen=self.config.smooth_window + max(0, lookback - 1))

    # --- queries -------------------------------------------------------------------------------
    def smoothed(self) -> float:
        """Mean of the recent finite losses (NaN when there are none yet)."""
        return self.level_before(math.inf)

    def level_before(self, step: float) -> float:
        """Mean of the last ``smooth_window`` finite losses of the steps before ``step``."""
        values = self._last(step)
        return sum(values) / len(values) if values else math.nan

    def _last(self, before: float = math.inf) -> list[float]:
        return [v for s, v in self._recent if s < before][-self.config.smooth_window:]

    def idle(self, step: int) -> bool:
        """Whether nothing in progress depends on the step a finding reaches the policy at:
        no reduced-LR phase or ramp, no relapse watch, no cooldown. Findings may then arrive
        late (up to ``lookback`` steps) and be decided exactly as at their own step."""
        return (self.phase is Phase.NORMAL or self.phase is Phase.GAVE_UP) and step > self.watch_until \
            and step >= self.cooldown_until

    def verdict_due(self, step: int) -> bool:
        """Whether the recovered branch under trial has now trained as many steps as were
        discarded: score it (after this step's optimizer step) and pass the scores to ``step``."""
        return self.trial is not None and self.trial.head is not None and step >= self.trial.due_step

    def lr_multiplier(self, step: int) -> float:
        """The factor on the scheduled LR for the optimizer step that produces sample ``step``."""
        if self.phase is Phase.LOW_LR:
            return self.factor
        if self.phase is Phase.RAMP:
            ramp = max(1, self.config.restore_ramp_steps)
            frac = min(1.0, max(0.0, (step - self.ramp_start) / ramp))
            return self.factor + (self.ceiling - self.factor) * frac
        return self.ceiling

    # --- the decision --------------------------------------------------------------------------
    def step(self, step: int, loss: float | None, findings: Sequence[Finding],
             snapshots: Sequence[int], *, judged: Scores | None = None) -> Decision:
        """Decide what to do after the optimizer step that produced ``step``'s ``loss``.

        ``judged``: the recovered branch's scores when ``verdict_due(step)``; the verdict comes
        first, and a revert ends the step's decision (the findings came from the rejected branch).
        """
        decision = Decision()
        cfg = self.config
        if judged is not None and self.verdict_due(step):
            self._verdict(step, judged, decision)
            if decision.revert_to is not None:
                return decision
        if findings and self.phase is not Phase.GAVE_UP and cfg.enabled:
            trigger = self._trigger(step, findings)
            # the level before the finding's step (its loss, and any after it, not included)
            before = self.level_before(trigger.step) if trigger is not None else math.nan
            if trigger is not None and self._watching(step):
                self._relapse(step, snapshots, decision, before,
                              f"a {trigger.reason.value} at step {step}, {step - self.restore_step} steps after "
                              f"restoring the LR at step {self.restore_step}")
                return decision
            if trigger is not None:
                self._rollback(step, trigger, before, snapshots, decision)
                return decision
        if loss is not None and math.isfinite(loss):
            self._recent.append((step, float(loss)))
        if self.phase is Phase.LOW_LR:
            self._maybe_restore(step, decision)
        elif self.phase is Phase.RAMP and step >= self.ramp_start + cfg.restore_ramp_steps:
            self.phase = Phase.NORMAL
        elif self._watching(step):
            self._watch_relapse(step, snapshots, decision)
        return decision

    def _trigger(self, step: int, findings: Sequence[Finding]) -> Finding | None:
        # an info finding (shape only, or contradicted by other evidence) is reported, never acted
        # on; nor is one that says so itself (evidence["actionable"] False: nothing could judge the action)
        wanted = [f for f in findings if f.reason in self.config.triggers and f.severity is not Severity.INFO
                  and f.reason.value not in self.false_alarms and f.evidence.get("actionable", True) is not False]
        if not wanted:
            return None
        wanted.sort(key=lambda f: (_PRIORITY.get(f.reason, 9), f.onset_step))
        first = wanted[0]
        if first.reason is Reason.NONFINITE or self._watching(step):
            return first
        if self.phase is not Phase.NORMAL or step < self.cooldown_until:
            return None
        return first

    def _watching(self, step: int) -> bool:
        return self.phase is Phase.NORMAL and step <= self.watch_until and Reason.RELAPSE.value not in self.false_alarms

    # --- the safety net ------------------------------------------------------------------------
    def _begin_trial(self, step: int, finding: Finding, target: int, before: dict[str, Any],
                     decision: Decision, snapshots: Sequence[int]) -> dict[str, Any]:
        """A rollback from ``step`` to ``target``: start its trial, or fold it into the one running
        (a rollback inside the branch under trial: the verdict waits for the steps it discards).
        A new trial looks first (``check_step``) unless a non-finite loss left nothing to compare."""
        discarded = step - target
        if self.trial is not None:
            self.trial.due_step += discarded
            return {"safety_net": "inside the branch under trial", "verdict_step": self.trial.due_step}
        if not self.config.safety_net:
            return {}
        self.trial = Trial(finding.reason.value, step, target, step + discarded, before, finding=finding)
        decision.keep_head = True
        if self.config.precheck and finding.reason is not Reason.NONFINITE:
            decision.check_step = check_target(snapshots, finding.onset_step, step,
                                               plateau=finding.reason is Reason.EARLY_CONVERGENCE)
        return {"verdict_step": step + discarded}

    def head_scored(self, decision: Decision, scores: Scores | None, why_not: str = "") -> None:
        """The abandoned head's scores, taken before the rollback was carried out; None (or a
        head whose loss is not finite, or fewer than two units) runs the recovery unjudged."""
        trial = self.trial
        if trial is None or trial.head is not None or not decision.keep_head:
            return
        rollback = next((a for a in decision.actions if a.action is ActionKind.ROLLBACK), None)
        if scores is None or scores.units < 2 or not math.isfinite(scores.mean):
            if scores is not None and scores.units >= 2:
                why_not = f"the abandoned head's held-out loss is {_fmt(scores.mean)}: nothing to go back to"
            elif scores is not None:
                why_not = f"{scores.units} evaluation unit(s): too few to estimate the noise"
            self.trial = None
            decision.keep_head = False
            decision.check_step = None
            if rollback is not None:
                rollback.details.pop("verdict_step", None)
                rollback.details["safety_net"] = f"off for this rollback: {why_not or 'no evaluation batches'}"
            return
        trial.head = scores
        if rollback is not None:
            rollback.details["head_score"] = scores.mean
            rollback.message += (f"; the abandoned head (held-out loss {_fmt(scores.mean)}) is kept, and the "
                                 f"recovery is judged against it at step {trial.due_step}")

    def checked(self, step: int, decision: Decision, scores: Scores | None) -> bool:
        """The look before the rollback: ``scores`` are the held-out scores of the weights of
        snapshot ``decision.check_step``. True: go on with the rollback. False: it is declined
        (see the module docstring); the integration puts the head back, and ``decision`` now says
        so: its rollback and LR override are replaced by a ``decline`` action, and the trigger
        finding is ``info`` with the comparison as its evidence."""
        trial, check = self.trial, decision.check_step
        rollback = next((a for a in decision.actions if a.action is ActionKind.ROLLBACK), None)
        if trial is None or trial.head is None or check is None:
            return True
        if scores is None or scores.units < 2 or not math.isfinite(scores.mean):
            if rollback is not None:
                rollback.details["precheck"] = f"the snapshot of step {check} could not be scored"
            return True
        gain, se, n = paired_gain(scores, trial.head)  # positive where the head does better
        finding = trial.finding
        plateau = trial.reason == Reason.EARLY_CONVERGENCE.value
        floor = self.config.precheck_plateau_gain * abs(scores.mean) if plateau else 0.0
        threshold = max(self.config.judge_z * se, floor)
        numbers = {"check_step": check, "check_score": scores.mean, "head_score": trial.head.mean,
                   "gain": gain, "stderr": se, "units": n, "threshold": threshold}
        # a plateau at a no-learning level stands while the held-out loss is still at that level:
        # falling *to* the unigram level is not learning from the inputs
        level = _level(finding) if plateau else None
        if level is not None:
            numbers["level"] = level
        at_level = level is not None and trial.head.mean >= level
        if at_level or not (math.isfinite(gain) and math.isfinite(se) and gain > threshold):
            if rollback is not None:
                rollback.details["precheck"] = numbers
            return True
        self._load_fields(trial.before)  # the rollback never happened: rollbacks, LR and phase as before
        self.trial = None
        self.verdicts["decline"] = self.verdicts.get("decline", 0) + 1
        self.cooldown_until = step + self.config.cooldown_steps * 2 ** min(self.verdicts["decline"] - 1, 6)
        since = f"step {check}" if finding is None or check >= finding.onset_step else f"step {check}, before the onset"
        why = (f"the head's held-out loss {_fmt(trial.head.mean)} beats {_fmt(scores.mean)} at {since} by "
               f"{_fmt(gain)} (more than {_fmt(threshold)}: {self.config.judge_z:g} x {_fmt(se)} over {n} units"
               + (f", and at least {self.config.precheck_plateau_gain:g} of the loss" if plateau else "") + ")"
               + (f" and is clearly below the no-learning level the plateau sat at ({_fmt(level)})"
                  if level is not None else ""))
        if finding is not None and finding.severity is not Severity.INFO:
            finding.severity = Severity.INFO
            finding.evidence["confidence"] = "contradicted"
            finding.evidence["support"] = [*finding.evidence.get("support", ["training loss"]),
                                           "held-out loss improved since the onset"]
            finding.evidence["precheck"] = numbers
            finding.message += f"; not acted on: {why}"
        decision.actions = [a for a in decision.actions
                            if a.action not in (ActionKind.ROLLBACK, ActionKind.LR_OVERRIDE)]
        decision.actions.append(Action(
            ActionKind.DECLINE, step,
            f"declined the {trial.reason} rollback to step {trial.target_step}: {why}; the run has improved since the "
            f"trouble began, so training goes on from step {step} unchanged (no step lost)",
            from_step=step, to_step=check, reason=as_reason(trial.reason),
            details={**numbers, "target_step": trial.target_step}))
        decision.rollback_to = None
        decision.keep_head = False
        decision.check_step = None
        decision.save = False
        decision.drop_head = True
        return False

    @property
    def judging(self) -> bool:
        """Whether a rollback is under trial (its head kept and scored)."""
        return self.trial is not None and self.trial.head is not None

    def conclude(self, step: int, judged: Scores) -> Decision:
        """At train end, a trial whose verdict is not due yet is judged now, on ``judged`` (the
        branch as it ends): the run has no more steps to give the recovery, and it ends with the
        better of the two branches."""
        decision = Decision()
        if self.judging:
            self._verdict(step, judged, decision)
        return decision

    def unjudged(self, step: int, why: str) -> Decision:
        """The branch under trial could not be scored (``why``): the recovery stays, unjudged."""
        decision = Decision()
        trial, self.trial = self.trial, None
        if trial is not None:
            decision.drop_head = True
            decision.actions.append(Action(
                ActionKind.KEEP, step, f"kept the recovery from the {trial.reason} rollback at step {step} "
                f"without a verdict: {why}", from_step=trial.head_step, to_step=trial.target_step,
                reason=as_reason(trial.reason), details={"unjudged": why, "head_step": trial.head_step,
                                              "target_step": trial.target_step}))
        return decision

    def _verdict(self, step: int, branch: Scores, decision: Decision) -> None:
        trial = self.trial
        assert trial is not None and trial.head is not None
        self.trial = None
        verdict = judge(trial.head, branch, self.config.judge_z)
        early = step < trial.due_step
        when = (f"at step {step}, before equal compute (training ended)" if early
                else f"at step {step}, after as many steps as the rollback from step {trial.head_step} discarded")
        details = {**verdict.details(), "head_step": trial.head_step, "target_step": trial.target_step,
                   "equal_compute": not early}
        if verdict.keep:
            self.verdicts["keep"] += 1
            decision.drop_head = True
            decision.actions.append(Action(
                ActionKind.KEEP, step, f"kept the recovery from the {trial.reason} rollback {when}: {verdict.why}",
                from_step=trial.head_step, to_step=trial.target_step, reason=as_reason(trial.reason), details=details))
            return
        self._revert(step, trial, verdict, when, details, decision)

    def _revert(self, step: int, trial: Trial, verdict: Verdict, when: str, details: dict[str, Any],
                decision: Decision) -> None:
        cfg = self.config
        self.verdicts["revert"] += 1
        rollbacks, gave_up = self.rollbacks, self.phase is Phase.GAVE_UP
        self._load_fields(trial.before)
        self.rollbacks = rollbacks  # the budget stays spent: a trial is a rollback too
        if gave_up:
            self.phase = Phase.GAVE_UP
        self.cooldown_until = step + cfg.cooldown_steps * 2 ** max(0, self.rollbacks - 1)
        false_alarm = trial.reason != Reason.NONFINITE.value  # a NaN is never a false alarm
        if false_alarm and trial.reason not in self.false_alarms:
            self.false_alarms.append(trial.reason)
        effect = (f"{trial.reason} findings start no recovery for the rest of the run (still reported)"
                  if false_alarm else "non-finite losses still trigger recovery")
        details.update({"false_alarm": trial.reason if false_alarm else None, "effect": effect,
                        "lr_multiplier": self.ceiling})
        decision.revert_to = trial.head_step
        decision.abandon_after = trial.target_step
        decision.snapshot = True
        decision.actions.append(Action(
            ActionKind.REVERT, step,
            f"reverted the {trial.reason} rollback {when}: {verdict.why}; back to the abandoned branch's head "
            f"(the state of step {trial.head_step}, bitwise) and its LR schedule; {effect}",
            from_step=step, to_step=trial.head_step, lr_factor=self.ceiling, reason=as_reason(trial.reason), details=details))

    def _give_up(self, step: int, why: str, decision: Decision) -> None:
        self.phase = Phase.GAVE_UP
        stop = self.config.on_give_up == "stop"
        then = "stopping training" if stop else "training continues without further recovery"
        message = f"gave up at step {step} after {self.rollbacks} rollback(s): {why}; {then}"
        decision.actions.append(Action(ActionKind.GIVE_UP, step, message, reason=Reason.GAVE_UP))
        decision.findings.append(Finding(Reason.GAVE_UP, Severity.CRITICAL, step, step, message,
                                         evidence={"rollbacks": self.rollbacks}, detector="recovery"))
        decision.stop = stop

    def _rollback(self, step: int, finding: Finding, before: float, snapshots: Sequence[int],
                  decision: Decision) -> None:
        cfg = self.config
        if self.rollbacks >= cfg.max_rollbacks:
            self._give_up(step, f"{finding.reason.value} again and the budget of {cfg.max_rollbacks} "
                                f"rollbacks is spent", decision)
            return
        target = pick_target(snapshots, finding.onset_step, cfg.rollback_steps, step)
        if target is None:
            self._give_up(step, f"{finding.reason.value} but no snapshot before step {step} to roll back to",
                          decision)
            return
        fields = self._fields()
        self.factor = min(cfg.lr_factor * cfg.escalation ** self.rollbacks, self.ceiling)
        self.rollbacks += 1
        self.trigger_level = before if math.isfinite(before) else math.inf
        self.trigger_reason = finding.reason.value
        self.detected_step = step
        self.target_step = target
        replay = step - target
        self.low_until_min = step + min(replay, cfg.max_low_lr_steps)
        self.low_deadline = step + cfg.max_low_lr_steps
        self.cooldown_until = step + cfg.cooldown_steps * 2 ** (self.rollbacks - 1)
        self.watch_until = -1
        self.phase = Phase.LOW_LR
        self._recent.clear()
        gap = finding.onset_step - target
        decision.rollback_to = target
        decision.save = True
        trial = self._begin_trial(step, finding, target, fields, decision, snapshots)
        decision.actions.append(Action(
            ActionKind.ROLLBACK, step,
            f"rolled back from step {step} to the snapshot of step {target} ({gap} steps before the "
            f"{finding.reason.value} onset at step {finding.onset_step}); global step keeps counting and the "
            f"data loader keeps moving, so the {replay} discarded steps' batches are not replayed",
            from_step=step, to_step=target, lr_factor=self.factor, reason=finding.reason,
            details={"onset_step": finding.onset_step, "rollback": self.rollbacks,
                     "discarded_steps": replay, "data_replayed": False, **trial}))
        level = "a non-finite loss" if not math.isfinite(self.trigger_level) else _fmt(self.trigger_level)
        decision.actions.append(Action(
            ActionKind.LR_OVERRIDE, step,
            f"LR set to {_fmt(self.factor)} x schedule until the smoothed loss is below {level} and at least "
            f"{self.low_until_min - step} steps have passed (at most {cfg.max_low_lr_steps})",
            from_step=step, to_step=self.low_deadline, lr_factor=self.factor, reason=finding.reason))

    def _maybe_restore(self, step: int, decision: Decision) -> None:
        cfg = self.config
        level = self.smoothed()
        below = len(self._last()) >= min(cfg.smooth_window, 5) and level < self.trigger_level
        trajectory = self.trigger_reason in _TRAJECTORY
        if trajectory:
            done = (step >= self.low_until_min and below) or step >= self.low_deadline
        else:  # an event: back at the level before it, or the discarded distance replayed
            done = below or step >= self.low_until_min
        if not done:
            return
        why = (f"smoothed loss {_fmt(level)} is below the trigger level {_fmt(self.trigger_level)}" if below
               else f"{step - self.detected_step} steps at the reduced LR passed (smoothed loss {_fmt(level)})")
        ramp = cfg.restore_ramp_steps
        how = f"over {ramp} steps" if ramp else "at once"
        target = f"{_fmt(self.ceiling)} x schedule" if self.ceiling < 1.0 else "the schedule"
        self.phase = Phase.RAMP if ramp else Phase.NORMAL
        self.ramp_start = step
        self.restore_step = step
        self.restore_level = level
        self.watch_until = step + ramp + cfg.relapse_watch_steps
        self.watch_level = below and trajectory  # a rise of the smoothed loss counts only after trajectory trouble
        decision.snapshot = True
        decision.save = True
        decision.actions.append(Action(
            ActionKind.LR_RESTORE, step, f"LR back to {target} {how} at step {step}: {why}",
            from_step=self.detected_step, to_step=step, lr_factor=self.ceiling, reason=as_reason(self.trigger_reason),
            details={"smoothed_loss": level, "trigger_level": self.trigger_level, "ramp_steps": ramp}))
        decision.actions.append(Action(ActionKind.SAVE, step, f"asked for a checkpoint of the recovered state at step {step}",
                                       reason=as_reason(self.trigger_reason)))

    def _watch_relapse(self, step: int, snapshots: Sequence[int], decision: Decision) -> None:
        cfg = self.config
        gain = self.trigger_level - self.restore_level
        if not (self.watch_level and math.isfinite(gain) and gain > 0) or len(self._last()) < cfg.smooth_window:
            return
        level = self.smoothed()
        limit = self.restore_level + cfg.relapse_fraction * gain
        if level <= limit:
            return
        self._relapse(step, snapshots, decision, level,
                      f"smoothed loss rose from {_fmt(self.restore_level)} to {_fmt(level)} within "
                      f"{step - self.restore_step} steps of restoring the LR at step {self.restore_step} "
                      f"(limit {_fmt(limit)})")

    def _relapse(self, step: int, snapshots: Sequence[int], decision: Decision, level: float, why: str) -> None:
        cfg = self.config
        message = f"{why}; the scheduled LR looks too high for this run"  # printed after the reason
        relapse = Finding(Reason.RELAPSE, Severity.WARNING, step, self.restore_step, message,
                          evidence={"restore_level": self.restore_level, "level": level,
                                    "trigger_level": self.trigger_level},
                          detector="recovery")
        decision.findings.append(relapse)
        self.watch_until = -1
        if self.rollbacks >= cfg.max_rollbacks:
            self._give_up(step, f"relapse and the budget of {cfg.max_rollbacks} rollbacks is spent", decision)
            return
        target = max((s for s in snapshots if s <= self.restore_step), default=None)
        if target is None:
            # a run resumed after the restore holds snapshots from its resume step on only
            self.ceiling *= cfg.relapse_lr_scale
            held = f"the oldest snapshot held is of step {min(snapshots)}" if snapshots else "no snapshot is held"
            decision.actions.append(Action(
                ActionKind.LR_OVERRIDE, step,
                f"no rollback after the relapse: no snapshot at or before the post-recovery step {self.restore_step} "
                f"({held}; a run resumed after that step starts its snapshots anew); LR kept at "
                f"{_fmt(self.ceiling)} x schedule from step {step} on instead",
                from_step=step, lr_factor=self.ceiling, reason=Reason.RELAPSE,
                details={"no_snapshot_before": self.restore_step}))
            return
        fields = self._fields()
        self.rollbacks += 1
        self.ceiling *= cfg.relapse_lr_scale
        self.factor = min(self.factor, self.ceiling)
        self.cooldown_until = step + cfg.cooldown_steps * 2 ** (self.rollbacks - 1)
        self.restore_step = step
        self.watch_until = step + cfg.relapse_watch_steps
        if math.isfinite(level):
            self.trigger_level = level
        self._recent.clear()
        decision.rollback_to = target
        decision.save = True
        trial = self._begin_trial(step, relapse, target, fields, decision, snapshots)
        decision.actions.append(Action(
            ActionKind.ROLLBACK, step,
            f"rolled back from step {step} to the post-recovery snapshot of step {target} after a relapse; "
            f"the data loader keeps moving, so the {step - target} discarded steps' batches are not replayed",
            from_step=step, to_step=target, lr_factor=self.ceiling, reason=Reason.RELAPSE,
            details={"rollback": self.rollbacks, "discarded_steps": step - target, "data_replayed": False,
                     **trial}))
        decision.actions.append(Action(
            ActionKind.LR_OVERRIDE, step,
            f"LR kept at {_fmt(self.ceiling)} x schedule from step {step} on, because the full schedule relapsed",
            from_step=step, lr_factor=self.ceiling, reason=Reason.RELAPSE))

    # --- state ---------------------------------------------------------------------------------
    _FIELDS = ("rollbacks", "factor", "ceiling", "cooldown_until", "trigger_level", "trigger_reason",
               "detected_step", "target_step", "low_until_min", "low_deadline", "ramp_start",
               "restore_step", "restore_level", "watch_until", "watch_level")

    def _fields(self) -> dict[str, Any]:
        """The state machine's own fields (JSON-ready), without the trial and the verdict tallies."""
        out: dict[str, Any] = {name: getattr(self, name) for name in self._FIELDS}
        for key in ("trigger_level", "restore_level"):
            value = out[key]
            out[key] = value if math.isfinite(value) else str(value)
        out["phase"] = self.phase.value
        out["window"] = self._last()  # what a state saved before "recent" existed held
        out["recent"] = [list(pair) for pair in self._recent]
        return out

    def _load_fields(self, state: dict[str, Any]) -> None:
        for name in self._FIELDS:
            if name in state:
                setattr(self, name, state[name])
        self.trigger_level = float(self.trigger_level)
        self.restore_level = float(self.restore_level)
        self.phase = Phase(state.get("phase", Phase.NORMAL.value))
        # a state saved before "recent" existed: its window, as if logged just before the next step
        recent = state.get("recent") or [(-1, v) for v in state.get("window", [])]
        self._recent = deque(((int(s), float(v)) for s, v in recent), maxlen=self._recent.maxlen)

    def state_dict(self) -> dict[str, Any]:
        out = self._fields()
        out["trial"] = None if self.trial is None else self.trial.to_record()
        out["false_alarms"] = list(self.false_alarms)
        out["verdicts"] = dict(self.verdicts)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_fields(state)
        trial = state.get("trial")
        self.trial = None if trial is None else Trial.from_record(trial)
        self.false_alarms = [str(r) for r in state.get("false_alarms", [])]
        self.verdicts = {"keep": 0, "revert": 0, "decline": 0, **state.get("verdicts", {})}

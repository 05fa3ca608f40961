"""Offline analysis of a finished or running log: the online detectors, replayed.

``analyze`` feeds every sample of a ``RunLog`` through the same ``DetectorSuite`` the training
callback uses, so ``lossguard watch --once`` reports what the callback would have seen. For a
lossguard telemetry log the findings recorded online are merged in: a recorded finding with the
same (reason, onset_step) as a replayed one is the same finding and appears once (the recorded
copy wins, its message is what the person saw during training); recorded findings the replay
does not reproduce (a relapse or give-up from recovery, findings made with another config) are
kept. The result is sorted by step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lossguard.config import DetectionConfig
from lossguard.numbers import as_float, as_step
from lossguard.records import Action, ActionKind, Finding
from lossguard.signals.references import Objective, References, objective_from_keys
from lossguard.signals.suite import DetectorSuite
from lossguard.status import RunStatus, StatusVerdict, run_status
from lossguard.telemetry.runlog import RunLog, SampleColumns


@dataclass
class Analysis:
    """What the detectors found in one run, and the overall verdict."""

    source: str
    steps: int
    last_step: int | None
    findings: list[Finding] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    max_steps: int | None = None
    num_train_epochs: float | None = None
    ended: bool = True

    @property
    def verdict(self) -> StatusVerdict:
        """What was handled, what is open, what could not be judged (``lossguard.status``)."""
        return run_status(self.findings, self.actions, self.steps, last_step=self.last_step,
                          max_steps=self.max_steps, num_train_epochs=self.num_train_epochs, ended=self.ended)

    @property
    def status(self) -> RunStatus:
        return self.verdict.status

    def to_json(self, run_dir: str) -> dict[str, Any]:
        """The one object ``watch --once --json`` prints."""
        actions = []
        for a in self.actions:
            rec = a.to_record()
            rec.pop("kind", None)
            actions.append(rec)
        return {
            "run_dir": run_dir,
            "source": self.source,
            "steps": self.steps,
            "last_step": self.last_step,
            "findings": [f.summary() for f in self.findings],
            "actions": actions,
            "verdicts": [_verdict(a) for a in self.actions if a.action in (ActionKind.KEEP, ActionKind.REVERT,
                                                                              ActionKind.DECLINE)],
            **self.verdict.to_json(),
        }


def analyze(log: RunLog, config: DetectionConfig | None = None) -> Analysis:
    """Replay every sample of ``log`` through the detectors and merge the recorded findings."""
    if config is None and log.run and isinstance(log.run.get("config"), dict):
        config = _config_from_run(log.run["config"])
    suite = DetectorSuite(config, max_steps=log.max_steps, num_train_epochs=log.num_train_epochs)
    suite.set_references(offline_references(log))
    for step, loss in eval_losses(log):
        suite.observe_eval(step, loss)
    cols = log.columns if log.columns is not None else SampleColumns.from_samples(log.samples)
    # the batch path of the same detectors: the findings ``observe`` would give, sample by sample
    found: list[Finding] = suite.observe_many(cols)
    seen = {(f.reason, f.onset_step) for f in log.findings}
    merged = list(log.findings) + [f for f in found if (f.reason, f.onset_step) not in seen]
    merged.sort(key=lambda f: (f.step, f.onset_step))
    return Analysis(
        source=log.source,
        steps=len(cols),
        last_step=cols.last_step,
        findings=merged,
        actions=list(log.actions),
        max_steps=log.max_steps,
        num_train_epochs=log.num_train_epochs,
        ended=log.ended,
    )


def offline_references(log: RunLog) -> References:
    """What a log says about its own references: the record the callback wrote, else the
    objective its metric keys betray (``rewards/chosen``: a preference run). A foreign log has
    no vocabulary or label tokens, so its plateaus stay shape-only findings."""
    refs = References.from_dict(log.references)
    if refs.objective is Objective.UNKNOWN and log.metric_keys:
        objective = objective_from_keys(log.metric_keys)
        if objective is not Objective.UNKNOWN:
            refs = refs.merged(References(objective=objective, sources={"objective": "the log's metric keys"}))
    return refs


def eval_losses(log: RunLog) -> list[tuple[int, float]]:
    """(step, eval loss) of the log's evaluations, in step order, finite values only."""
    out = {}
    for rec in log.evals:
        step, loss = as_step(rec.get("step")), as_float(rec.get("eval_loss"), finite=True)
        if step is not None and loss is not None:
            out[step] = loss
    return sorted(out.items())


def _verdict(action: Action) -> dict[str, Any]:
    """The safety net's verdict on one rollback, from its ``keep`` / ``revert`` / ``decline``
    action (a declined one compares the head with a snapshot, ``check_step``, not a branch)."""
    d = action.details
    out = {"step": action.step, "verdict": action.action.value,
           "reason": None if action.reason is None else action.reason.value,
           "head_step": d.get("head_step", action.from_step if action.action is ActionKind.DECLINE else None),
           "head_score": d.get("head_score"), "branch_score": d.get("branch_score"),
           "gain": d.get("gain"), "stderr": d.get("stderr"), "false_alarm": d.get("false_alarm")}
    if action.action is ActionKind.DECLINE:
        out.update(check_step=d.get("check_step"), check_score=d.get("check_score"))
    return out


def _config_from_run(cfg: dict[str, Any]) -> DetectionConfig | None:
    """The detection thresholds the run was trained with, when its run record carries them."""
    det = cfg.get("detection")
    if not isinstance(det, dict):
        return None
    known = {k: v for k, v in det.items() if k in DetectionConfig.__dataclass_fields__}
    try:
        return DetectionConfig(**known)
    except (TypeError, ValueError):
        return None

"""A run's overall status: what was handled, what is still open, and what could not be judged.

One function decides it for ``watch --once`` (and its ``--fail-on``), the dashboard, the report
and the daemon, so they never disagree. The statuses, from best to worst:

- ``no_data``: no sample to judge (an empty or not yet written log). Never "healthy": there is
  no evidence either way, and ``--fail-on`` treats it as a failure.
- ``healthy``: samples, and no warning or critical finding.
- ``recovered``: every warning or critical finding was handled: a rollback undid the steps it
  names (its target is at or before the finding's onset), the safety net's verdict included (a
  rollback it reverted as a false alarm is handled too).
- ``warning`` / ``critical``: the worst finding that is still open at the end of the log (not
  undone by a rollback, or lossguard gave up).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from lossguard.records import Action, ActionKind, Finding, Reason, Severity


class RunStatus(str, enum.Enum):
    """The verdict on a whole run, as badges and ``--fail-on`` read it."""

    NO_DATA = "no_data"
    HEALTHY = "healthy"
    RECOVERED = "recovered"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def label(self) -> str:
        """How a badge spells it: ``NO DATA``, ``RECOVERED``."""
        return self.value.replace("_", " ").upper()


# what ``--fail-on`` accepts, mildest first: each fails a run at that level or worse
FAIL_ON = ("info", "recovered", "warning", "critical")


@dataclass
class StatusVerdict:
    """The status and the findings behind it."""

    status: RunStatus
    handled: list[Finding] = field(default_factory=list)
    open: list[Finding] = field(default_factory=list)
    checks_off: list[str] = field(default_factory=list)
    unfinished: str | None = None  # "ended early: last step 276 of 600"
    n_findings: int = 0

    def fails(self, threshold: str) -> bool:
        """Whether ``--fail-on threshold`` fails this run (no data always does).

        ``info``: any finding at all, handled or not; ``recovered``: any trouble, handled or
        not; ``warning``: open trouble; ``critical``: open critical trouble.
        """
        if threshold not in FAIL_ON:
            raise ValueError(f"--fail-on {threshold!r}: expected one of {', '.join(FAIL_ON)}")
        s = self.status
        if s is RunStatus.NO_DATA:
            return True
        if threshold == "info":
            return self.n_findings > 0
        order = (RunStatus.HEALTHY, RunStatus.RECOVERED, RunStatus.WARNING, RunStatus.CRITICAL)
        return order.index(s) >= order.index(RunStatus(threshold))

    def summary(self) -> str:
        """One line for a console or a badge's caption: what was handled, what is open."""
        parts = []
        if self.status is RunStatus.NO_DATA:
            parts.append("no samples to judge yet")
        if self.handled:
            parts.append("handled: " + ", ".join(_short(f) for f in self.handled))
        if self.open:
            parts.append("open: " + ", ".join(_short(f) for f in self.open))
        if self.unfinished:
            parts.append(self.unfinished)
        if self.checks_off:
            parts.append("checks off: " + "; ".join(self.checks_off))
        return "; ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status.value,
            "handled": [f"{f.reason.value}@{f.step}" for f in self.handled],
            "open": [f"{f.reason.value}@{f.step}" for f in self.open],
            "checks_off": list(self.checks_off),
            "unfinished": self.unfinished,
        }


def _short(f: Finding) -> str:
    return f"{f.reason.value} at step {f.step}"


def _undone_by(f: Finding, actions: Sequence[Action]) -> bool:
    """Whether a rollback at or after the finding went back to (or before) its onset."""
    for a in actions:
        if a.action is not ActionKind.ROLLBACK or a.step < f.step:
            continue
        if a.to_step is not None and a.to_step <= f.onset_step:
            return True
        if a.to_step is None and a.reason is f.reason:
            return True
    return False


def run_status(findings: Sequence[Finding], actions: Sequence[Action], n_samples: int, *,
               last_step: int | None = None, max_steps: int | None = None,
               num_train_epochs: float | None = None, ended: bool = True) -> StatusVerdict:
    """The run's status from its findings and lossguard's actions (see the module docstring).

    Args:
        n_samples: samples read; none means ``no_data``.
        last_step, max_steps, ended: a log that did not reach the end of training (``ended``
            False) and stops short of ``max_steps`` is called unfinished.
        num_train_epochs: with ``max_steps``, tells whether "early" (the plateau check) had a
            run length to be measured against.
    """
    verdict = StatusVerdict(RunStatus.NO_DATA, n_findings=len(findings))
    if not max_steps and not num_train_epochs:
        verdict.checks_off.append("early convergence (run length unknown: the log gives no max_steps or epochs)")
    if not ended and max_steps and last_step is not None and 0 <= last_step < max_steps:
        verdict.unfinished = (f"unfinished: last step {last_step} of {max_steps} "
                              "(no end of training in the log: still running, or it stopped early)")
    if n_samples <= 0:
        return verdict
    gave_up = any(a.action is ActionKind.GIVE_UP for a in actions)
    for f in findings:
        if f.severity is Severity.INFO:
            continue
        if f.reason is not Reason.GAVE_UP and _undone_by(f, actions):
            verdict.handled.append(f)
        else:
            verdict.open.append(f)
    if verdict.open or gave_up:
        worst = max((f.severity for f in verdict.open), key=lambda s: s.rank, default=Severity.CRITICAL)
        verdict.status = RunStatus.CRITICAL if gave_up else RunStatus(worst.value)
    elif verdict.handled:
        verdict.status = RunStatus.RECOVERED
    else:
        verdict.status = RunStatus.HEALTHY
    return verdict

"""What a run's log says about the moment training resumes at a checkpoint's step.

A resumed run appends to the log of the run it continues. Before it writes anything, the log
tells two things its checkpoint may not:

- whether lossguard had *abandoned* the state being resumed: the branch that went through the
  checkpoint's step later rolled back (or reverted) to a step before it. A run killed between
  that rollback and the next checkpoint leaves the newest ``checkpoint-*`` inside the stretch
  lossguard threw away, and ``resume_from_checkpoint=True`` picks it;
- lossguard's recovery history up to that step (rollbacks spent, a low-LR phase still open),
  for a checkpoint that holds no ``lossguard_state.json``.

Branches: each ``run`` record starts one at its ``start_step``; records past a later branch's
start step that were written before it belong to an abandoned branch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lossguard.numbers import as_float, as_step
from lossguard.telemetry.reader import parse_line

_WANTED = (b'"kind":"run"', b'"kind":"action"', b'"kind": "run"', b'"kind": "action"')


@dataclass
class ResumeScan:
    """The log's account of a resume at ``step``."""

    step: int
    #: the rollback/revert that abandoned the resumed state: its step, target and reason
    abandoned: dict[str, Any] | None = None
    rollbacks: int = 0  #: rollbacks of the live branch up to ``step``
    low_lr: dict[str, Any] | None = None  #: an LR override still in force at ``step``: its step and factor
    actions: list[dict[str, Any]] = field(default_factory=list, repr=False)


def scan_for_resume(path: str | os.PathLike[str], step: int) -> ResumeScan:
    """Read ``path`` (a lossguard log; missing or unreadable: nothing known) for a resume at ``step``."""
    scan = ResumeScan(step)
    live: list[dict[str, Any]] = []  # actions at or before ``step`` of the branch leading to it
    through: list[dict[str, Any]] = []  # actions past ``step`` of the latest branch that went through it
    try:
        fh = open(Path(path), "rb")
    except OSError:
        return scan
    with fh:
        for raw in fh:
            if not any(w in raw for w in _WANTED):
                continue
            rec = parse_line(raw)
            if rec is None:
                continue
            if rec.get("kind") == "run":
                start = as_step(rec.get("start_step"))
                if start is None:
                    continue
                live = [a for a in live if (as_step(a.get("step")) or 0) <= start]
                if start <= step:
                    through = []  # a branch through ``step`` starts here
                continue
            at = as_step(rec.get("step"))
            if at is None:
                continue
            (live if at <= step else through).append(rec)
    for a in through:
        to = as_step(a.get("to_step"))
        if a.get("action") in ("rollback", "revert") and to is not None and to < step:
            scan.abandoned = {"step": as_step(a.get("step")), "to_step": to, "reason": a.get("reason"),
                              "action": a.get("action")}
            break
    scan.actions = live
    scan.rollbacks = sum(1 for a in live if a.get("action") == "rollback")
    for a in live:
        if a.get("action") == "lr_override":
            scan.low_lr = {"step": as_step(a.get("step")), "lr_factor": as_float(a.get("lr_factor"))}
        elif a.get("action") in ("lr_restore", "give_up", "revert"):
            scan.low_lr = None
    return scan

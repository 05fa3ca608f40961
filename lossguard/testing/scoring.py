"""Scoring any rule's alarms against labelled runs, the same way for lossguard and its peers.

A run carries its labels (reason, onset step), whether it is healthy, its logging interval and
its length. For one reason R:

- a label of R is **detected** by the first alarm standing for R between its onset and
  ``onset + max_latency`` (``synthetic.max_latency``: a few logging intervals for spikes and
  non-finite values, 600 steps for divergence, half the run for a plateau); the latency is
  that alarm's step minus the onset;
- an alarm at the logged value right after another one for R continues the same **episode**
  and is not counted again (a warning repeated at every value of a stretch is one warning);
- further episodes for R inside that window are the same finding again: **redundant**, neither
  right nor wrong (a rule that cuts the LR every 11 values of a plateau found it once);
- an alarm standing for several reasons (KillLossSpike's loss spike: spike or divergence) that
  detects a label of one of its other reasons is **excused** here;
- an alarm at or after the onset of a divergence or a non-finite loss is a consequence of it,
  **excused** (as the synthetic benchmark has always counted it);
- every other alarm for R is **false**.

precision = detected / (detected + false episodes); recall = detected / labels; F1 their harmonic
mean. "Healthy runs alarmed" counts the healthy runs with at least one alarm for R: for
early convergence that is a rollback (lossguard) or a stopped or slowed run (the peers) that
should not have happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lossguard.records import Reason
from lossguard.testing.peers import Alarm
from lossguard.testing.synthetic import max_latency

_CATASTROPHIC = (Reason.DIVERGENCE, Reason.NONFINITE)


@dataclass(frozen=True)
class LabelledRun:
    """What scoring needs to know about one run."""

    name: str
    labels: tuple[tuple[Reason, int], ...]
    healthy: bool
    log_every: int
    max_steps: int


@dataclass
class Tally:
    """How one rule did for one reason over a set of runs."""

    reason: Reason
    labels: int = 0
    detected: int = 0
    false_alarms: int = 0
    redundant: int = 0
    excused: int = 0
    repeats: int = 0
    healthy_runs: int = 0
    healthy_runs_alarmed: int = 0
    healthy_alarms: int = 0
    latencies: list[int] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.detected / self.labels if self.labels else math.nan

    @property
    def precision(self) -> float:
        n = self.detected + self.false_alarms
        return self.detected / n if n else math.nan

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        if math.isnan(p) or math.isnan(r):
            return math.nan
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    @property
    def healthy_alarm_share(self) -> float:
        return self.healthy_runs_alarmed / self.healthy_runs if self.healthy_runs else math.nan

    @property
    def median_latency(self) -> float:
        return float(np.median(self.latencies)) if self.latencies else math.nan

    def add(self, other: Tally) -> None:
        for name in ("labels", "detected", "false_alarms", "redundant", "excused", "repeats", "healthy_runs",
                     "healthy_runs_alarmed", "healthy_alarms"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies.extend(other.latencies)


def tally(reason: Reason, runs: list[tuple[LabelledRun, list[Alarm]]]) -> Tally:
    """Score the alarms of one rule for ``reason`` over ``runs`` (each run with its alarms)."""
    out = Tally(reason)
    for run, alarms in runs:
        score_run(out, run, alarms)
    return out


def score_run(out: Tally, run: LabelledRun, alarms: list[Alarm]) -> None:
    """Add one run's alarms for ``out.reason`` to ``out``."""
    reason = out.reason
    limit = max_latency(reason, run.log_every, run.max_steps)
    mine = sorted((a for a in alarms if reason in a.reasons), key=lambda a: a.step)
    episodes = []
    for k, a in enumerate(mine):
        if k and a.step - mine[k - 1].step <= run.log_every:
            out.repeats += 1
        else:
            episodes.append(a)
    onsets = [o for r, o in run.labels if r == reason]
    catastrophic = [o for r, o in run.labels if r in _CATASTROPHIC]
    if run.healthy:
        out.healthy_runs += 1
        out.healthy_alarms += len(episodes)
        out.healthy_runs_alarmed += bool(episodes)
    found: set[int] = set()
    out.labels += len(onsets)
    for a in episodes:
        hit = next((o for o in onsets if o <= a.step <= o + limit), None)
        if hit is not None:
            if hit in found:
                out.redundant += 1
            else:
                found.add(hit)
                out.detected += 1
                out.latencies.append(a.step - hit)
            continue
        if _detects_other(a, run):
            out.excused += 1
        elif any(a.step >= o for o in catastrophic):
            out.excused += 1
        else:
            out.false_alarms += 1


def _detects_other(alarm: Alarm, run: LabelledRun) -> bool:
    for r, o in run.labels:
        if r in alarm.reasons and o <= alarm.step <= o + max_latency(r, run.log_every, run.max_steps):
            return True
    return False

"""A preference loss against its own no-learning level: ln 2.

A preference loss is not a convergence signal (``degenerate.py`` switches the plateau and trend
checks off for it), but the sigmoid family (DPO, a pairwise reward model) has a level of its
own: -log sigmoid(0) = ln 2, where the policy scores chosen and rejected answers exactly as its
reference does. Such a run starts there (the policy is its reference at step 0). Two things are
then trouble whatever the curve's shape:

- **nothing learned**: the loss stays at ln 2 with a zero gradient. A margin that is identically
  zero has no gradient (chosen and rejected identical, or both masked), so no LR ever moves it.
  A run at ln 2 with a live gradient is only warming up (real DPO logs sit there for 60 steps
  while the LR ramps from 1e-9): not a finding.
- **worse than the reference**: most recent values above ln 2 and their median well above it:
  the policy now prefers the rejected answers more than its reference did (an LR or beta too
  high). Real healthy DPO logs are noisy (0.1-1.3 per step) but their median sits below ln 2.

Only runs whose objective is ``preference`` and whose first loss is ln 2 (within 1%) are read:
other preference losses (IPO, KTO, ORPO's NLL term) have other levels. The findings are
warnings that the recovery does not act on (``evidence["actionable"]`` False): the safety net's
judge scores a language-model loss and cannot score a preference batch, so a rollback could not
be judged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lossguard.config import DetectionConfig
from lossguard.numbers import fmt
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.base import Columns
from lossguard.signals.references import Objective, References

LN2 = math.log(2.0)
_START = 0.01  # the first loss within this share of ln 2: a sigmoid-family preference loss
_AT = 2e-3  # a value this close to ln 2 sits at it
_ZERO_GRAD = 1e-6  # a gradient norm at most this is zero (float noise of an identically-zero margin)
_STUCK = 20  # values at ln 2 with a zero gradient
_WINDOW = 10  # recent values judged for "worse than the reference"
_ABOVE = 0.8  # share of them above ln 2
_WORSE = 1.15  # and their median this many times ln 2


class PreferenceLevelDetector:
    """A sigmoid-family preference loss stuck at ln 2 with no gradient, or sitting above it."""

    name = "preference"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.references = References()
        self.first: float | None = None
        self.stuck = 0  # consecutive values at ln 2 with a zero gradient
        self.stuck_since: int | None = None
        self.recent: list[tuple[int, float]] = []
        self.fired_stuck = False
        self.fired_worse = False

    def _reads(self) -> bool:
        return (self.references.objective is Objective.PREFERENCE and self.first is not None
                and abs(self.first - LN2) <= _START * LN2)

    def update(self, sample: Sample) -> Finding | None:
        loss = sample.loss
        if loss is None or not math.isfinite(loss):
            return None
        if self.first is None:
            self.first = float(loss)
        if not self._reads():
            return None
        grad = sample.grad_norm
        if abs(loss - LN2) <= _AT and grad is not None and math.isfinite(grad) and grad <= _ZERO_GRAD:
            if self.stuck == 0:
                self.stuck_since = sample.step
            self.stuck += 1
        else:
            self.stuck, self.stuck_since = 0, None
        self.recent = [*self.recent, (sample.step, float(loss))][-_WINDOW:]
        if self.stuck >= _STUCK and not self.fired_stuck:
            self.fired_stuck = True
            return self._stuck(sample.step)
        if len(self.recent) == _WINDOW and not self.fired_worse:
            values = [v for _, v in self.recent]
            above = sum(v > LN2 for v in values)
            median = float(np.median(values))
            if above >= _ABOVE * _WINDOW and median > _WORSE * LN2:
                self.fired_worse = True
                return self._worse(sample.step, median, above)
        return None

    def _stuck(self, step: int) -> Finding:
        onset = self.stuck_since if self.stuck_since is not None else step
        return Finding(
            reason=Reason.EARLY_CONVERGENCE,
            severity=Severity.WARNING,
            step=step,
            onset_step=onset,
            message=(f"Nothing learned at step {step}: the preference loss has sat at ln 2 = {fmt(LN2)} with a zero "
                     f"gradient for {self.stuck} steps since step {onset}: the policy scores chosen and rejected "
                     "answers alike, as its reference does, and a margin that is identically zero has no gradient "
                     "to move it (chosen and rejected identical, or both masked?). No LR can fix this; check the "
                     "pairs. Not acted on: the safety net cannot judge a preference loss."),
            evidence={"rule": "reference", "reference": "no-preference", "reference_level": LN2, "level": LN2,
                      "steps": self.stuck, "confidence": "corroborated",
                      "support": ["preference loss at ln 2", "zero gradient"], "actionable": False},
            detector=self.name,
        )

    def _worse(self, step: int, median: float, above: int) -> Finding:
        onset = next(s for s, v in self.recent if v > LN2)
        return Finding(
            reason=Reason.DIVERGENCE,
            severity=Severity.WARNING,
            step=step,
            onset_step=onset,
            message=(f"Worse than the reference at step {step}: {above} of the last {_WINDOW} preference losses are "
                     f"above ln 2 = {fmt(LN2)} (median {fmt(median)}): the policy now prefers the rejected answers "
                     "more than its reference does. The LR or beta is likely too high. Not acted on: the safety "
                     "net cannot judge a preference loss."),
            evidence={"rule": "preference_level", "reference_level": LN2, "level": median, "above": above,
                      "window": _WINDOW, "support": ["preference loss above ln 2"], "actionable": False},
            detector=self.name,
        )

    def update_many(self, columns: Columns) -> list[tuple[int, Finding]]:
        """``update`` over a stretch of steps; (row, finding) pairs, same results."""
        out = []
        steps, losses, grads = columns.steps, columns.loss, columns.grad_norm
        for i in np.flatnonzero(np.isfinite(losses)).tolist():
            g = float(grads[i])
            f = self.update(Sample(step=int(steps[i]), loss=float(losses[i]), grad_norm=g if math.isfinite(g) else None))
            if f is not None:
                out.append((i, f))
        return out

    def reset_after_rollback(self, step: int) -> None:
        self.stuck, self.stuck_since, self.recent = 0, None, []

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first, "stuck": self.stuck, "stuck_since": self.stuck_since,
                "recent": [list(p) for p in self.recent], "fired_stuck": self.fired_stuck,
                "fired_worse": self.fired_worse}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        first = state["first"]
        self.first = None if first is None else float(first)
        self.stuck = int(state["stuck"])
        self.stuck_since = state["stuck_since"]
        self.recent = [(int(s), float(v)) for s, v in state["recent"]]
        self.fired_stuck = bool(state["fired_stuck"])
        self.fired_worse = bool(state["fired_worse"])

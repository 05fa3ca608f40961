"""Losses that are not convergence signals (RL, DPO, GRPO): near zero or negative."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lossguard.config import DetectionConfig
from lossguard.numbers import fmt
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.base import Columns


class DegenerateLossDetector:
    """Notices a loss that hovers around zero or goes negative, and says so once.

    A policy-gradient or preference loss is not a cross-entropy: it can sit near 0 or below 0
    while the model improves, so "it stopped going down" means nothing. After one
    ``not_a_convergence_signal`` info finding, ``active`` is set and the suite drops plateau
    and divergence findings for the rest of the run. Exact zeros are left to the zero-loss check.
    """

    name = "degenerate"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.active = False
        self.first: list[float] = []

    def update(self, sample: Sample) -> Finding | None:
        if self.active:
            return None
        loss = sample.loss
        if loss is None or not math.isfinite(loss):
            return None
        why = None
        if loss < -1e-6:
            why = f"loss {fmt(loss)} is negative"
        elif len(self.first) < self.config.min_history:
            self.first.append(loss)
            if len(self.first) == self.config.min_history:
                vals = sorted(abs(v) for v in self.first)
                med = vals[len(vals) // 2]
                if vals[-1] > 0.0 and med < self.config.degenerate_level:
                    why = (
                        f"the median |loss| of the first {len(vals)} samples is {fmt(med)} "
                        f"< {fmt(self.config.degenerate_level)}"
                    )
        if why is None:
            return None
        self.active = True
        return Finding(
            reason=Reason.NOT_A_CONVERGENCE_SIGNAL,
            severity=Severity.INFO,
            step=sample.step,
            onset_step=sample.step,
            message=(
                f"At step {sample.step} {why}: this looks like an RL/preference-style loss, which is "
                "not a convergence signal; plateau and divergence checks are off for this run."
            ),
            evidence={"loss": loss},
            detector=self.name,
        )

    def update_many(self, columns: Columns) -> list[tuple[int, Finding]]:
        """``update`` over a stretch of steps; (row, finding) pairs, same results."""
        steps, losses = columns.steps, columns.loss
        idx = np.flatnonzero(np.isfinite(losses))
        k = 0
        while k < len(idx) and not self.active and len(self.first) < self.config.min_history:
            i = int(idx[k])
            f = self.update(Sample(step=int(steps[i]), loss=float(losses[i])))
            k += 1
            if f is not None:
                return [(i, f)]
        if self.active:
            return []
        neg = idx[k:][losses[idx[k:]] < -1e-6]
        if len(neg) == 0:
            return []
        i = int(neg[0])
        f = self.update(Sample(step=int(steps[i]), loss=float(losses[i])))
        return [] if f is None else [(i, f)]

    def reset_after_rollback(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "first": list(self.first)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = bool(state["active"])
        self.first = [float(v) for v in state["first"]]

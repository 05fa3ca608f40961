"""Losses that are not convergence signals (RL, DPO, GRPO): by their objective, or negative."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lossguard.config import DetectionConfig
from lossguard.numbers import fmt
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.base import Columns
from lossguard.signals.references import References


class DegenerateLossDetector:
    """Notices a loss that is not a convergence signal, and says so once.

    A policy-gradient or preference loss is not a cross-entropy: it can sit near 0 or below 0
    while the model improves, so "it stopped going down" means nothing. It is recognised from
    the objective (``references.py``: the trainer's class online, the log's keys offline) or
    from a negative value, which no cross-entropy takes. A small positive loss is not enough: a
    seq2seq or a memorising fine-tune sits at 0.003 and its climbs are real. After one
    ``not_a_convergence_signal`` info finding, ``active`` is set and the suite drops plateau and
    divergence findings for the rest of the run. Exact zeros are left to the zero-loss check.
    """

    name = "degenerate"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.active = False
        self.references = References()

    def update(self, sample: Sample) -> Finding | None:
        if self.active:
            return None
        loss = sample.loss
        if loss is None or not math.isfinite(loss):
            return None
        objective = self.references.objective
        if not objective.is_convergence_signal:
            source = self.references.sources.get("objective", "the run")
            why = f"the loss is a {objective.value} objective ({source})"
        elif loss < -1e-6:
            why = f"loss {fmt(loss)} is negative"
        else:
            return None
        self.active = True
        return Finding(
            reason=Reason.NOT_A_CONVERGENCE_SIGNAL,
            severity=Severity.INFO,
            step=sample.step,
            onset_step=sample.step,
            message=(
                f"At step {sample.step} {why}: a preference/RL-style loss is not a convergence signal; "
                "plateau and divergence checks are off for this run."
            ),
            evidence={"loss": loss, "objective": objective.value},
            detector=self.name,
        )

    def update_many(self, columns: Columns) -> list[tuple[int, Finding]]:
        """``update`` over a stretch of steps; (row, finding) pairs, same results."""
        if self.active:
            return []
        steps, losses = columns.steps, columns.loss
        finite = np.isfinite(losses)
        if self.references.objective.is_convergence_signal:
            finite &= losses < -1e-6
        idx = np.flatnonzero(finite)
        if len(idx) == 0:
            return []
        i = int(idx[0])
        f = self.update(Sample(step=int(steps[i]), loss=float(losses[i])))
        return [] if f is None else [(i, f)]

    def reset_after_rollback(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = bool(state["active"])

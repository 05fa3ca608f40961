"""NaN or infinite loss / grad norm: the run is already broken at this step."""

from __future__ import annotations

import math
from typing import Any

from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.base import fmt


class NonfiniteDetector:
    """Reports the first non-finite loss or grad norm of each streak, immediately, as critical.

    A NaN loss means the weights or the batch already hold NaN/inf: every later step is wasted
    until something rolls back. One finding per streak; the streak ends at the next finite step.
    """

    name = "nonfinite"

    def __init__(self) -> None:
        self.streak_start: int | None = None
        self.count = 0

    def update(self, sample: Sample) -> Finding | None:
        loss, gn = sample.loss, sample.grad_norm
        bad_loss = loss is not None and not math.isfinite(loss)
        bad_gn = gn is not None and not math.isfinite(gn)
        if not (bad_loss or bad_gn):
            if loss is not None or gn is not None:
                self.streak_start = None
            return None
        self.count += 1
        if self.streak_start is not None:
            return None
        self.streak_start = sample.step
        parts = []
        if bad_loss:
            parts.append(f"loss {loss}")
        if bad_gn:
            parts.append(f"grad norm {gn}")
        elif gn is not None:
            parts.append(f"grad norm {fmt(gn)}")
        return Finding(
            reason=Reason.NONFINITE,
            severity=Severity.CRITICAL,
            step=sample.step,
            onset_step=sample.step,
            message=f"Non-finite values at step {sample.step}: {', '.join(parts)}.",
            evidence={"loss": loss, "grad_norm": gn},
            detector=self.name,
        )

    def reset_after_rollback(self, step: int) -> None:
        self.streak_start = None

    def state_dict(self) -> dict[str, Any]:
        return {"streak_start": self.streak_start, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak_start = state["streak_start"]
        self.count = int(state["count"])

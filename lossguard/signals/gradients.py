"""Gradient pathologies: a vanishing gradient, and a loss of exactly zero with nothing to learn."""

from __future__ import annotations

import math
from typing import Any

from lossguard.config import DetectionConfig
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.base import fmt

_ZERO = 1e-12


class GradientDetector:
    """Grad norm ~0 for ``vanishing_window`` samples in a row: the weights have stopped moving.

    When the loss is exactly 0 as well (and the grad norm is 0 or not logged), the likelier
    story is that every label in the batch is masked (-100): the model is being shown nothing
    to learn. That is reported as ``zero_loss`` instead. One finding per streak.
    """

    name = "gradients"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.vanish_start: int | None = None
        self.vanish_count = 0
        self.zero_start: int | None = None
        self.zero_count = 0

    def update(self, sample: Sample) -> Finding | None:
        c = self.config
        loss, gn = sample.loss, sample.grad_norm
        step = sample.step
        gn_zero = gn is not None and math.isfinite(gn) and abs(gn) <= c.vanishing_grad_norm
        loss_zero = loss is not None and abs(loss) <= _ZERO
        finding = None
        if loss_zero and (gn is None or gn_zero):
            if self.zero_start is None:
                self.zero_start = step
            self.zero_count += 1
            if self.zero_count == c.vanishing_window:
                gn_text = "grad norm 0" if gn is not None else "grad norm not logged"
                finding = Finding(
                    reason=Reason.ZERO_LOSS,
                    severity=Severity.WARNING,
                    step=step,
                    onset_step=self.zero_start,
                    message=(
                        f"Loss exactly 0 ({gn_text}) for {self.zero_count} samples since step "
                        f"{self.zero_start}: labels may be fully masked (-100), nothing is being learned."
                    ),
                    evidence={"samples": self.zero_count, "grad_norm": gn},
                    detector=self.name,
                )
        elif loss is not None or gn is not None:
            self.zero_start = None
            self.zero_count = 0
        if gn is None or loss_zero:
            return finding
        if gn_zero:
            if self.vanish_start is None:
                self.vanish_start = step
            self.vanish_count += 1
            if self.vanish_count == c.vanishing_window:
                finding = Finding(
                    reason=Reason.GRAD_VANISHING,
                    severity=Severity.WARNING,
                    step=step,
                    onset_step=self.vanish_start,
                    message=(
                        f"Gradient norm {fmt(gn)} <= {fmt(c.vanishing_grad_norm)} for "
                        f"{self.vanish_count} samples since step {self.vanish_start}: the weights are "
                        f"not moving (loss {fmt(loss) if loss is not None else 'not logged'})."
                    ),
                    evidence={"grad_norm": gn, "samples": self.vanish_count},
                    detector=self.name,
                )
        else:
            self.vanish_start = None
            self.vanish_count = 0
        return finding

    def reset_after_rollback(self, step: int) -> None:
        self.vanish_start = self.zero_start = None
        self.vanish_count = self.zero_count = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "vanish_start": self.vanish_start,
            "vanish_count": self.vanish_count,
            "zero_start": self.zero_start,
            "zero_count": self.zero_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vanish_start = state["vanish_start"]
        self.vanish_count = int(state["vanish_count"])
        self.zero_start = state["zero_start"]
        self.zero_count = int(state["zero_count"])

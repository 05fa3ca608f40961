"""A learning rate too high for the model: the gradient explodes again and again while the loss
barely moves.

One gradient explosion is an event (a bad batch); several within a few hundred steps, with the
loss making no progress across them, is the optimizer overshooting: clipping hides each one
from the loss, and the run goes nowhere. The user's notes give the remedy: roll back and go on
at a reduced learning rate. This stage counts the gradient-explosion findings it is shown
(before the suite's cooldown folds them), reports ``lr_too_high`` once per episode, and names
it as the likely cause on a plateau or a divergence found while the explosions keep coming.
"""

from __future__ import annotations

import math
from typing import Any

from lossguard.config import DetectionConfig
from lossguard.numbers import as_float, fmt
from lossguard.records import Finding, Reason, Severity

WINDOW = 300  # steps over which explosions are counted
COUNT = 3  # explosions in the window that make it a pattern
PROGRESS = 0.1  # the loss fell less than this share across them


class LRTooHighStage:
    name = "lr_too_high"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.events: list[tuple[int, float | None]] = []  # (step, loss) of recent explosions
        self.active = False

    def review(self, findings: list[Finding], step: int) -> list[Finding]:
        out = list(findings)
        for f in findings:
            if f.reason is Reason.GRAD_EXPLOSION:
                self.events.append((f.step, as_float(f.evidence.get("loss"), finite=True)))
        self.events = [e for e in self.events if e[0] > step - WINDOW]
        if len(self.events) < COUNT:
            self.active = False
        elif not self.active and self._no_progress():
            self.active = True
            out.append(self._finding(step))
        if len(self.events) >= COUNT - 1:
            for f in out:
                if f.reason in (Reason.EARLY_CONVERGENCE, Reason.DIVERGENCE) and "likely_cause" not in f.evidence:
                    f.evidence["likely_cause"] = Reason.LR_TOO_HIGH.value
                    f.message += (f" Likely cause: the learning rate is too high ({len(self.events)} gradient "
                                  f"explosions in the last {WINDOW} steps).")
        return out

    def _no_progress(self) -> bool:
        losses = [v for _, v in self.events if v is not None]
        if len(losses) < 2:
            return True  # explosions without a logged loss: the pattern alone
        first, last = losses[0], losses[-1]
        return last > first - PROGRESS * abs(first)

    def _finding(self, step: int) -> Finding:
        steps = [s for s, _ in self.events]
        losses = [v for _, v in self.events if v is not None]
        moved = (f"; the loss went {fmt(losses[0])} -> {fmt(losses[-1])} across them"
                 if len(losses) >= 2 and all(math.isfinite(v) for v in losses) else "")
        return Finding(
            reason=Reason.LR_TOO_HIGH,
            severity=Severity.WARNING,
            step=step,
            onset_step=steps[0],
            message=(
                f"Learning rate too high at step {step}: {len(steps)} gradient explosions since step {steps[0]} "
                f"(steps {', '.join(str(s) for s in steps[-6:])}){moved}. The optimizer overshoots and clipping "
                "hides it; roll back and continue at a lower learning rate."
            ),
            evidence={"explosions": steps, "losses": losses},
            detector=self.name,
        )

    def reset_after_rollback(self, step: int) -> None:
        self.events = [e for e in self.events if e[0] <= step]
        self.active = False

    def state_dict(self) -> dict[str, Any]:
        return {"events": [list(e) for e in self.events], "active": self.active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = [(int(s), None if v is None else float(v)) for s, v in state.get("events", [])]
        self.active = bool(state.get("active", False))

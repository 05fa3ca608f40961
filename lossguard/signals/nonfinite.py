"""NaN or infinite loss / grad norm: the run is already broken at this step."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lossguard.numbers import fmt
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.base import Columns


class NonfiniteDetector:
    """Reports the first non-finite loss or grad norm of each streak, immediately.

    A NaN loss means the weights or the batch already hold NaN/inf: every later step is wasted
    until something rolls back (critical). A non-finite grad norm under a finite loss is what
    fp16 mixed precision's loss scaler produces when it skips a step and lowers its scale:
    reported as info, and if the weights were hit the next loss is non-finite and critical.
    One finding per streak (a streak that starts on the grad norm gets a second, critical, one
    when its loss goes non-finite); the streak ends at the next finite step.
    """

    name = "nonfinite"

    def __init__(self) -> None:
        self.streak_start: int | None = None
        self.critical = False  # the streak has had its critical (non-finite loss) finding
        self.count = 0

    def update(self, sample: Sample) -> Finding | None:
        loss, gn = sample.loss, sample.grad_norm
        bad_loss = loss is not None and not math.isfinite(loss)
        bad_gn = gn is not None and not math.isfinite(gn)
        if not (bad_loss or bad_gn):
            if loss is not None or gn is not None:
                self.streak_start = None
            return None
        return self._bad(sample.step, loss, gn, bad_loss, bad_gn)

    def _bad(self, step: int, loss: float | None, gn: float | None, bad_loss: bool, bad_gn: bool) -> Finding | None:
        self.count += 1
        if self.streak_start is None:
            self.streak_start = step
            self.critical = False
        elif self.critical or not bad_loss:
            return None
        self.critical = bad_loss
        return self._finding(step, loss, gn, bad_loss, bad_gn)

    def _finding(self, step: int, loss: float | None, gn: float | None, bad_loss: bool, bad_gn: bool) -> Finding:
        parts = []
        if bad_loss:
            parts.append(f"loss {loss}")
        elif loss is not None:
            parts.append(f"loss {fmt(loss)}")
        if bad_gn:
            parts.append(f"grad norm {gn}")
        elif gn is not None:
            parts.append(f"grad norm {fmt(gn)}")
        message = f"Non-finite values at step {step}: {', '.join(parts)}."
        if not bad_loss:
            message += (" The loss is finite: with fp16 mixed precision this is the loss scaler skipping the step "
                        "and lowering its scale, which is harmless now and then; not acted on.")
        return Finding(
            reason=Reason.NONFINITE,
            severity=Severity.CRITICAL if bad_loss else Severity.INFO,
            step=step,
            onset_step=step,
            message=message,
            evidence={"loss": loss, "grad_norm": gn},
            detector=self.name,
        )

    def update_many(self, columns: Columns) -> list[tuple[int, Finding]]:
        """``update`` over a stretch of steps (``has_*`` say which values were logged); same findings."""
        steps, losses, grad_norms = columns.steps, columns.loss, columns.grad_norm
        has_loss, has_gn = columns.has_loss, columns.has_grad_norm
        fl, fg = np.isfinite(losses), np.isfinite(grad_norms)
        bl, bg = has_loss & ~fl, has_gn & ~fg
        bad = bl | bg
        ev = np.flatnonzero(bad | has_loss | has_gn)
        if len(ev) == 0:
            return []
        evbad = bad[ev]
        prev = np.concatenate([[self.streak_start is not None], evbad[:-1]])
        out = []
        for k in np.flatnonzero(evbad).tolist():
            i = int(ev[k])
            if not prev[k]:
                self.streak_start = None  # a finite step ended the last streak
            loss = float(losses[i]) if has_loss[i] else None
            gn = float(grad_norms[i]) if has_gn[i] else None
            f = self._bad(int(steps[i]), loss, gn, bool(bl[i]), bool(bg[i]))
            if f is not None:
                out.append((i, f))
        if not evbad[-1]:
            self.streak_start = None
        return out

    def reset_after_rollback(self, step: int) -> None:
        self.streak_start = None

    def state_dict(self) -> dict[str, Any]:
        return {"streak_start": self.streak_start, "critical": self.critical, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak_start = state["streak_start"]
        self.critical = bool(state.get("critical", False))
        self.count = int(state["count"])

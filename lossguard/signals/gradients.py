"""Gradient pathologies: a vanishing gradient, and a loss of exactly zero with nothing to learn."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lossguard.config import DetectionConfig
from lossguard.numbers import fmt
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.base import Columns
from lossguard.signals.stats import streak_counts

_ZERO = 1e-12


class GradientDetector:
    """Grad norm ~0 for ``vanishing_window`` samples in a row: the weights have stopped moving.

    A loss of exactly 0 for as long is reported as ``zero_loss``: with the grad norm 0 or not
    logged, every label in the batch is likely masked (-100) and the model is shown nothing to
    learn; with a live grad norm, the loss is below the log's rounding (a trivial or leaked
    task). One finding per streak.
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
        if loss_zero:
            if self.zero_start is None:
                self.zero_start = step
            self.zero_count += 1
            if self.zero_count == c.vanishing_window:
                finding = self._zero(step, self.zero_start, gn)
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
                finding = self._vanish(step, self.vanish_start, gn, loss)
        else:
            self.vanish_start = None
            self.vanish_count = 0
        return finding

    def _zero(self, step: int, start: int, gn: float | None) -> Finding:
        n = self.config.vanishing_window
        if gn is not None and math.isfinite(gn) and abs(gn) > self.config.vanishing_grad_norm:
            why = (f"grad norm {fmt(gn)}: the gradient is alive, so the loss is below what the log rounds to; "
                   "the task is trivial for the model (labels leaking into the inputs, duplicated examples, "
                   "a degenerate target), and it has nothing left to learn")
        else:
            gn_text = "grad norm 0" if gn is not None else "grad norm not logged"
            why = f"{gn_text}: labels may be fully masked (-100), nothing is being learned"
        return Finding(
            reason=Reason.ZERO_LOSS,
            severity=Severity.WARNING,
            step=step,
            onset_step=start,
            message=f"Loss exactly 0 for {n} samples since step {start} ({why}).",
            evidence={"samples": n, "grad_norm": gn},
            detector=self.name,
        )

    def _vanish(self, step: int, start: int, gn: float, loss: float | None) -> Finding:
        c = self.config
        return Finding(
            reason=Reason.GRAD_VANISHING,
            severity=Severity.WARNING,
            step=step,
            onset_step=start,
            message=(
                f"Gradient norm {fmt(gn)} <= {fmt(c.vanishing_grad_norm)} for "
                f"{c.vanishing_window} samples since step {start}: the weights are "
                f"not moving (loss {fmt(loss) if loss is not None else 'not logged'})."
            ),
            evidence={"grad_norm": gn, "samples": c.vanishing_window},
            detector=self.name,
        )

    def update_many(self, columns: Columns) -> list[tuple[int, Finding]]:
        """``update`` over a stretch of steps (``has_*`` say which values were logged); same findings."""
        steps, losses, grad_norms = columns.steps, columns.loss, columns.grad_norm
        has_loss, has_gn = columns.has_loss, columns.has_grad_norm
        c = self.config
        with np.errstate(invalid="ignore"):
            loss_zero = has_loss & (np.abs(losses) <= _ZERO)
            gn_zero = has_gn & np.isfinite(grad_norms) & (np.abs(grad_norms) <= c.vanishing_grad_norm)
        z = loss_zero
        z_reset = ~z & (has_loss | has_gn)
        out: list[tuple[int, Finding]] = []
        if z.any():
            zc = streak_counts(z, z_reset, self.zero_count)
            zs = _starts(steps, z, z_reset, self.zero_start)
            for i in np.flatnonzero(z & (zc == c.vanishing_window)).tolist():
                out.append((i, self._zero(int(steps[i]), int(zs[i]), float(grad_norms[i]) if has_gn[i] else None)))
            self.zero_count = int(zc[-1])
            self.zero_start = None if self.zero_count == 0 else int(zs[-1])
        else:
            self.zero_count, self.zero_start = _no_streak(z_reset, self.zero_count, self.zero_start)
        part = has_gn & ~loss_zero
        v_inc = part & gn_zero
        v_reset = part & ~gn_zero
        if v_inc.any():
            vc = streak_counts(v_inc, v_reset, self.vanish_count)
            vs = _starts(steps, v_inc, v_reset, self.vanish_start)
            for i in np.flatnonzero(v_inc & (vc == c.vanishing_window)).tolist():
                loss = float(losses[i]) if has_loss[i] else None
                out.append((i, self._vanish(int(steps[i]), int(vs[i]), float(grad_norms[i]), loss)))
            self.vanish_count = int(vc[-1])
            self.vanish_start = None if self.vanish_count == 0 else int(vs[-1])
        else:
            self.vanish_count, self.vanish_start = _no_streak(v_reset, self.vanish_count, self.vanish_start)
        out.sort(key=lambda p: p[0])
        return out

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


def _no_streak(reset: np.ndarray, count0: int, start0: int | None) -> tuple[int, int | None]:
    """(count, start) after a stretch with no streak value: what ``streak_counts``/``_starts`` end at."""
    if reset.any():
        return 0, None
    return count0, (None if count0 == 0 else (-1 if start0 is None else int(start0)))


def _starts(steps: np.ndarray, inc: np.ndarray, reset: np.ndarray, start0: int | None) -> np.ndarray:
    """Step where the current streak began, after each position (-1 while there is none)."""
    n = len(inc)
    first = inc & ~np.concatenate([[start0 is not None], _alive(inc, reset, start0 is not None)[:-1]])
    pos = np.where(first, np.arange(n), -1)
    np.maximum.accumulate(pos, out=pos)
    s0 = -1 if start0 is None else start0
    return np.where(pos >= 0, steps[np.maximum(pos, 0)], s0)


def _alive(inc: np.ndarray, reset: np.ndarray, alive0: bool) -> np.ndarray:
    """Whether a streak is running after each position (an inc after the last reset)."""
    n = len(inc)
    last_inc = np.where(inc, np.arange(n), -1)
    np.maximum.accumulate(last_inc, out=last_inc)
    last_reset = np.where(reset, np.arange(n), -1)
    np.maximum.accumulate(last_reset, out=last_reset)
    return np.where(last_inc > last_reset, True, (last_reset < 0) & alive0)

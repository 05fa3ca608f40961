"""Divergence: the loss is climbing, not just noisy."""

from __future__ import annotations

import math
from typing import Any

from lossguard.config import DetectionConfig
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.base import fmt
from lossguard.signals.stats import RollingRegression, RollingRobust

_LEVEL_WINDOW = 16


class DivergenceDetector:
    """A sustained rise of the loss above the best level the run has reached.

    Two conditions, both needed: the least-squares slope over the last ``divergence_window``
    samples is positive with probability >= ``divergence_probability`` (dlib's test), and the
    loss level (median of the last 16 samples, so spikes do not count) is at least
    ``divergence_min_rise`` (relative) above the lowest level seen so far. While the learning
    rate is still warming up, a rise three times as large is needed: early bumps are common and
    usually settle. The onset is the step where the level was lowest, where the climb began.
    """

    name = "divergence"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.trend = RollingRegression(self.config.divergence_window)
        self.level = RollingRobust(_LEVEL_WINDOW)
        self.best: float | None = None
        self.best_step = 0
        self.active = False
        self.last_lr: float | None = None
        self.warming_up = False
        self.last_step: int | None = None
        self.sized = False
        self.streak = 0

    def update(self, sample: Sample) -> Finding | None:
        loss = sample.loss
        if loss is None or not math.isfinite(loss):
            return None
        lr = sample.lr
        if lr is not None:
            last = self.last_lr
            self.warming_up = last is not None and lr > last * (1.0 + 1e-9)
            self.last_lr = lr
        step = sample.step
        if self.last_step is not None and not self.sized and step > self.last_step:
            gap = step - self.last_step
            self.sized = True
            if gap > 1:
                # sparse logs (logging_steps > 1): windows cover similar spans of steps
                self.trend = RollingRegression(max(10, self.config.divergence_window // gap))
                self.level = RollingRobust(max(5, _LEVEL_WINDOW // gap))
        self.last_step = step
        self.trend.push(step, loss)
        level = self.level
        level.push(loss)
        if len(level) < level.size:
            return None
        med = level.median()
        if self.best is None or med < self.best:
            self.best = med
            self.best_step = step
            self.active = False
            return None
        c = self.config
        best = self.best
        noise = level.sigma() * 1.25 / math.sqrt(level.size)
        rise_needed = c.divergence_min_rise * (3.0 if self.warming_up else 1.0) * max(abs(best), 1e-6)
        # the lowest of many noisy medians sits a few noise units low: ask for more than that
        rise_needed = max(rise_needed, 6.0 * noise)
        rise = med - best
        if self.active:
            if rise < 0.5 * rise_needed:
                self.active = False
            return None
        if rise < rise_needed or len(self.trend) < self.trend.size:
            self.streak = 0
            return None
        p = self.trend.prob_increasing()
        if p < c.divergence_probability:
            self.streak = 0
            return None
        # sustained: a chance excursion of a short median does not last half a level window
        self.streak += 1
        if self.streak < max(2, level.size // 2):
            return None
        self.active = True
        return Finding(
            reason=Reason.DIVERGENCE,
            severity=Severity.CRITICAL,
            step=step,
            onset_step=self.best_step,
            message=(
                f"Loss diverging at step {step}: level {fmt(med)} is {fmt(rise)} "
                f"({100.0 * rise / max(abs(best), 1e-12):.0f}%) above the best {fmt(best)} at step "
                f"{self.best_step}, rising with probability {p:.3f} over the last "
                f"{len(self.trend)} samples; onset {self.best_step}."
            ),
            evidence={"level": med, "best": best, "best_step": self.best_step, "probability": p},
            detector=self.name,
        )

    def reset_after_rollback(self, step: int) -> None:
        self.trend.clear()
        self.level.clear()
        self.active = False
        self.last_lr = None
        self.warming_up = False
        self.streak = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "trend": self.trend.state_dict(),
            "level": self.level.state_dict(),
            "best": self.best,
            "best_step": self.best_step,
            "active": self.active,
            "last_lr": self.last_lr,
            "warming_up": self.warming_up,
            "last_step": self.last_step,
            "sized": self.sized,
            "streak": self.streak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trend.load_state_dict(state["trend"])
        self.level.load_state_dict(state["level"])
        self.best = state["best"]
        self.best_step = int(state["best_step"])
        self.active = bool(state["active"])
        self.last_lr = state["last_lr"]
        self.warming_up = bool(state["warming_up"])
        self.last_step = state["last_step"]
        self.sized = bool(state["sized"])
        self.streak = int(state["streak"])

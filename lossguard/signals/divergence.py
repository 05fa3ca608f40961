"""Divergence: the loss is climbing, not just noisy."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from lossguard.config import DetectionConfig
from lossguard.numbers import fmt
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.base import Columns
from lossguard.signals.stats import (
    iqr_sigma_rows,
    iqr_sigma_sorted,
    median_sorted,
    median_sorted_rows,
    normal_cdf,
    raw_sums,
)

_LEVEL_WINDOW = 16
_SORT_BLOCK_VALUES = 1 << 18


def prob_increasing(points: list[tuple[int, float]]) -> float:
    """Probability that the least-squares trend through ``points`` rises (dlib's test, normal approx.)."""
    n = len(points)
    if n < 3:
        return 0.5
    sx, sy, sxx, sxy, syy = raw_sums(points, points[0][0])
    sxx -= sx * sx / n
    syy -= sy * sy / n
    sxy -= sx * sy / n
    if sxx <= 0.0:
        return 0.5
    slope = sxy / sxx
    sse = max(syy - slope * sxy, 0.0)
    se = math.sqrt(sse / (n - 2) / sxx)
    if se == 0.0:
        return 1.0 if slope > 0 else (0.0 if slope < 0 else 0.5)
    return normal_cdf(slope / se)


class DivergenceDetector:
    """A sustained rise of the loss above the best level the run has reached.

    Two conditions, both needed: the least-squares slope over the last ``divergence_window``
    samples is positive with probability >= ``divergence_probability`` (dlib's test), and the
    loss level (median of the last 16 samples, so spikes do not count) is at least
    ``divergence_min_rise`` (relative) above the lowest level seen so far, for half a level window
    in a row. While the learning rate is still warming up, a rise three times as large is needed:
    early bumps are common and usually settle. The onset is the step where the level was lowest,
    where the climb began.
    """

    name = "divergence"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.trend_size = self.config.divergence_window
        self.level_size = _LEVEL_WINDOW
        self.trend: deque[tuple[int, float]] = deque(maxlen=self.trend_size)
        self.level: deque[float] = deque(maxlen=self.level_size)
        self.best: float | None = None
        self.best_step = 0
        self.active = False
        self.last_lr: float | None = None
        self.warming_up = False
        self.last_step: int | None = None
        self.sized = False
        self.streak = 0

    @property
    def steady(self) -> bool:
        return self.sized and self.best is not None and len(self.trend) == self.trend_size

    def _needed(self, best: float, noise_sigma: float, warming: bool) -> float:
        c = self.config
        rise_needed = c.divergence_min_rise * (3.0 if warming else 1.0) * max(abs(best), 1e-6)
        # the lowest of many noisy medians sits a few noise units low: ask for more than that
        return max(rise_needed, 6.0 * (noise_sigma * 1.25 / math.sqrt(self.level_size)))

    def update(self, sample: Sample) -> Finding | None:
        loss = sample.loss
        if loss is None or not math.isfinite(loss):
            return None
        lr = sample.lr
        if lr is not None and lr == lr:  # a NaN LR is a missing one, as in the batch path
            last = self.last_lr
            self.warming_up = last is not None and lr > last * (1.0 + 1e-9)
            self.last_lr = lr
        step = sample.step
        if self.last_step is not None and not self.sized and step > self.last_step:
            gap = step - self.last_step
            self.sized = True
            if gap > 1:
                # sparse logs (logging_steps > 1): windows cover similar spans of steps
                self.trend_size = max(10, self.config.divergence_window // gap)
                self.level_size = max(5, _LEVEL_WINDOW // gap)
                self.trend = deque(self.trend, maxlen=self.trend_size)
                self.level = deque(self.level, maxlen=self.level_size)
        self.last_step = step
        self.trend.append((step, loss))
        self.level.append(loss)
        if len(self.level) < self.level_size:
            return None
        s = sorted(self.level)
        med = median_sorted(s)
        best = self.best
        if best is None or med < best:
            self.best = med
            self.best_step = step
            self.active = False
            self.streak = 0
            return None
        rise = med - best
        c = self.config
        if not self.active and rise < c.divergence_min_rise * (3.0 if self.warming_up else 1.0) * max(abs(best), 1e-6):
            # below the least ``_needed`` can ask for: the noise estimate is not worth computing
            self.streak = 0
            return None
        needed = self._needed(best, iqr_sigma_sorted(s), self.warming_up)
        if self.active:
            if rise < 0.5 * needed:
                self.active = False
                self.streak = 0
            return None
        if rise < needed or len(self.trend) < self.trend_size:
            self.streak = 0
            return None
        return self._test(step, med, rise, list(self.trend))

    def _test(self, step: int, med: float, rise: float, points: list[tuple[int, float]]) -> Finding | None:
        p = prob_increasing(points)
        if p < self.config.divergence_probability:
            self.streak = 0
            return None
        # sustained: a chance excursion of a short median does not last half a level window
        self.streak += 1
        if self.streak < max(2, self.level_size // 2):
            return None
        self.active = True
        best = self.best if self.best is not None else med
        return Finding(
            reason=Reason.DIVERGENCE,
            severity=Severity.CRITICAL,
            step=step,
            onset_step=self.best_step,
            message=(
                f"Loss diverging at step {step}: level {fmt(med)} is {fmt(rise)} "
                f"({100.0 * rise / max(abs(best), 1e-12):.0f}%) above the best {fmt(best)} at step "
                f"{self.best_step}, rising with probability {p:.3f} over the last "
                f"{len(points)} samples; onset {self.best_step}."
            ),
            evidence={"level": med, "best": best, "best_step": self.best_step, "probability": p},
            detector=self.name,
        )

    def update_many(self, columns: Columns) -> list[tuple[int, Finding]]:
        """``update`` over a stretch of steps; (row, finding) pairs, same results."""
        steps, losses, lrs = columns.steps, columns.loss, columns.lr
        out: list[tuple[int, Finding]] = []
        idx = np.flatnonzero(np.isfinite(losses))
        k = 0
        while k < len(idx) and not self.steady:
            i = int(idx[k])
            lr = float(lrs[i])
            f = self.update(Sample(step=int(steps[i]), loss=float(losses[i]), lr=None if math.isnan(lr) else lr))
            if f is not None:
                out.append((i, f))
            k += 1
        idx = idx[k:]
        if len(idx) == 0:
            return out
        y = losses[idx]
        st = steps[idx]
        lr = lrs[idx]
        n = len(y)
        L, T = self.level_size, self.trend_size
        lvl = np.concatenate([np.array(self.level, dtype=float), y])
        windows = np.lib.stride_tricks.sliding_window_view(lvl, L)[1:]  # row j: the level after value j
        med = np.empty(n)
        sig = np.empty(n)
        block = _SORT_BLOCK_VALUES // L  # sorted in cache-sized blocks, not one n x L copy
        for a in range(0, n, block):
            s = np.sort(windows[a:a + block], axis=1)
            med[a:a + block] = median_sorted_rows(s)
            sig[a:a + block] = iqr_sigma_rows(s)
        # warming up: the LR rose against the last logged LR; samples without an LR keep the flag
        has = ~np.isnan(lr)
        prev_lr = np.concatenate([[np.nan if self.last_lr is None else self.last_lr], lr])
        filled = prev_lr.copy()
        pos = np.where(~np.isnan(filled), np.arange(n + 1), 0)
        np.maximum.accumulate(pos, out=pos)
        filled = filled[pos]  # last known LR up to each position
        before = filled[:-1]
        rise_lr = has & ~np.isnan(before) & (lr > before * (1.0 + 1e-9))
        flag = np.where(has, rise_lr.astype(np.int8), -1)
        fpos = np.where(flag >= 0, np.arange(n), -1)
        np.maximum.accumulate(fpos, out=fpos)
        warming = np.where(fpos >= 0, flag[np.maximum(fpos, 0)] == 1, self.warming_up)
        best0 = float(self.best)  # steady: set
        run_min = np.minimum.accumulate(np.concatenate([[best0], med]))
        best_prev = run_min[:-1]
        newbest = med < best_prev
        nb_pos = np.where(newbest, np.arange(n), -1)
        np.maximum.accumulate(nb_pos, out=nb_pos)
        c = self.config
        needed = np.maximum(c.divergence_min_rise * np.where(warming, 3.0, 1.0) * np.maximum(np.abs(best_prev), 1e-6),
                            6.0 * (sig * 1.25 / math.sqrt(L)))
        rise = med - best_prev
        cand = np.flatnonzero(~newbest & (rise >= 0.5 * needed))
        tr_steps = np.concatenate([np.array([p[0] for p in self.trend], dtype=np.int64), st])
        tr_y = np.concatenate([np.array([p[1] for p in self.trend], dtype=float), y])
        step_list = st.tolist() if len(cand) else []
        best_step0 = self.best_step
        last = -1
        for j in cand.tolist():
            if j != last + 1:
                self.active = False
                self.streak = 0
            last = j
            b = int(nb_pos[j - 1]) if j > 0 else -1
            self.best = float(best_prev[j])
            self.best_step = step_list[b] if b >= 0 else best_step0
            r, nd = float(rise[j]), float(needed[j])
            if self.active:
                continue
            if r < nd:
                self.streak = 0
                continue
            a = j + 1
            pts = list(zip(tr_steps[a:a + T].tolist(), tr_y[a:a + T].tolist()))
            f = self._test(step_list[j], float(med[j]), r, pts)
            if f is not None:
                out.append((int(idx[j]), f))
        if last != n - 1:
            self.active = False
            self.streak = 0
        if newbest.any():
            b = int(nb_pos[-1])
            self.best, self.best_step = float(med[b]), int(st[b])
        else:
            self.best, self.best_step = best0, best_step0
        self.level = deque(lvl[-L:].tolist(), maxlen=L)
        self.trend = deque(zip(tr_steps[-T:].tolist(), tr_y[-T:].tolist()), maxlen=T)
        if has.any():
            self.last_lr = float(lr[np.flatnonzero(has)[-1]])
        self.warming_up = bool(warming[-1])
        self.last_step = int(st[-1])
        return out

    def reset_after_rollback(self, step: int) -> None:
        self.trend.clear()
        self.level.clear()
        self.active = False
        self.last_lr = None
        self.warming_up = False
        self.streak = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "trend": [list(p) for p in self.trend],
            "level": list(self.level),
            "trend_size": self.trend_size,
            "level_size": self.level_size,
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
        self.trend_size = int(state["trend_size"])
        self.level_size = int(state["level_size"])
        self.trend = deque(((int(s), float(v)) for s, v in state["trend"]), maxlen=self.trend_size)
        self.level = deque((float(v) for v in state["level"]), maxlen=self.level_size)
        self.best = state["best"]
        self.best_step = int(state["best_step"])
        self.active = bool(state["active"])
        self.last_lr = state["last_lr"]
        self.warming_up = bool(state["warming_up"])
        self.last_step = state["last_step"]
        self.sized = bool(state["sized"])
        self.streak = int(state["streak"])

"""Early convergence: the loss has stopped improving long before the run is over."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from lossguard.config import DetectionConfig
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.base import fmt
from lossguard.signals.decay import fit_decay
from lossguard.signals.stats import StepBins

_MAX_RECENT = 50_000
_MIN_WINDOW_SAMPLES = 5


class PlateauDetector:
    """A premature plateau: flat loss early in the run, where the curve says it should still fall.

    "No improvement for N steps" fires on epoch staircases, on long slow decays and on noise.
    This detector instead, every few steps while the run is in its first ``early_fraction``
    (progress from ``max_steps``, or epochs), looks at the last ``plateau_min_steps`` steps
    (the window; at least one epoch once past the first, so a staircase's drop is always inside
    it) and fires on either of:

    - **model**: a decay model (exponential or power law with a free asymptote, see
      ``decay.py``) fitted to the curve before the window predicts a drop over the window that
      matters (>= ``plateau_min_drop`` of the loss) and the observed slope falls short of the
      predicted one by ``plateau_z`` standard errors and by more than two thirds. Where the two
      families disagree the gentler prediction is used, so slow decays and curves that are
      genuinely converging do not fire.
    - **stall**: the loss is within ``stall_min_improvement`` of where the segment started and is
      not falling: the run never got going (a too-high learning rate stuck at the
      uniform-prediction loss looks like this).

    Two consecutive positive checks are needed. The onset is where the smoothed curve first came
    within noise of the plateau level. A segment restarts when the learning rate rises (warmup,
    restarts) and after a rollback. One finding per plateau; it re-arms when the loss drops again.
    """

    name = "plateau"

    def __init__(
        self,
        config: DetectionConfig | None = None,
        *,
        max_steps: int | None = None,
        num_train_epochs: float | None = None,
    ) -> None:
        self.config = config or DetectionConfig()
        self.max_steps = max_steps
        self.num_train_epochs = num_train_epochs
        self.bins = StepBins(64)
        self.recent: deque[tuple[int, float]] = deque(maxlen=_MAX_RECENT)
        self.seg_start: int | None = None
        self.first: list[float] = []
        self.start_level: float | None = None
        self.start_noise = 0.0
        self.last_lr: float | None = None
        self.last_step: int | None = None
        self.gap = 1
        self.steps_per_epoch: float | None = None
        self.epoch: float | None = None
        self.next_eval = 0
        self.hits = 0
        self.active = False
        self.episode_level = 0.0
        self.last_eval: dict[str, Any] = {}

    # progress -----------------------------------------------------------------------------
    def progress(self, step: int) -> float | None:
        """Share of training done at ``step`` (None when the run's length is unknown)."""
        if self.max_steps:
            return step / self.max_steps
        if self.num_train_epochs and self.epoch is not None:
            return self.epoch / self.num_train_epochs
        return None

    def _window(self) -> int:
        w = self.config.plateau_min_steps
        if self.epoch is not None and self.epoch >= 1.0 and self.steps_per_epoch:
            w = max(w, int(1.2 * self.steps_per_epoch))
        return max(w, 2 * _MIN_WINDOW_SAMPLES * self.gap + 1)

    def _restart(self, step: int) -> None:
        self.seg_start = step
        self.bins.clear()
        self.recent.clear()
        self.first = []
        self.start_level = None
        self.hits = 0
        self.next_eval = step

    # streaming ----------------------------------------------------------------------------
    def update(self, sample: Sample) -> Finding | None:
        loss = sample.loss
        if loss is None or not math.isfinite(loss):
            return None
        return self._update(sample.step, loss, sample.lr, sample.epoch)

    def _track(self, step: int, lr: float | None, epoch: float | None) -> None:
        """The bookkeeping every finite sample gets, early in the run or not."""
        if self.last_step is not None and step > self.last_step:
            self.gap = step - self.last_step
        self.last_step = step
        if epoch is not None and epoch > 0:
            self.epoch = epoch
            if step > 0:
                self.steps_per_epoch = step / epoch
        if lr is not None:
            if self.last_lr is not None and lr > self.last_lr * (1.0 + 1e-9):
                self._restart(step)
            self.last_lr = lr
        if self.seg_start is None:
            self._restart(step)

    def update_many(self, steps: np.ndarray, losses: np.ndarray, lrs: np.ndarray,
                    epochs: np.ndarray) -> list[tuple[int, Finding]]:
        """``update`` over arrays (NaN for a missing value); (index, finding) pairs, same results.

        Past ``early_fraction`` of a run of known length nothing can fire any more, so the rest
        only gets the bookkeeping.
        """
        out: list[tuple[int, Finding]] = []
        st, lo, lr, ep = steps.tolist(), losses.tolist(), lrs.tolist(), epochs.tolist()
        ef = self.config.early_fraction
        late = False
        for i in range(len(st)):
            loss = lo[i]
            if not math.isfinite(loss):
                continue
            r, e = lr[i], ep[i]
            r = None if r != r else r
            e = None if e != e else e
            if late:
                self._track(st[i], r, e)
                continue
            f = self._update(st[i], loss, r, e)
            if f is not None:
                out.append((i, f))
            if self.max_steps and not self.active and st[i] / self.max_steps > ef:
                late = True
        return out

    def _update(self, step: int, loss: float, lr: float | None, epoch: float | None) -> Finding | None:
        self._track(step, lr, epoch)
        progress = self.progress(step)
        if progress is not None and progress > self.config.early_fraction and not self.active:
            return None
        self.bins.push(step, loss)
        self.recent.append((step, loss))
        if self.start_level is None:
            self.first.append(loss)
            half = self.config.plateau_min_steps // 2
            if step - self.seg_start >= half and len(self.first) >= _MIN_WINDOW_SAMPLES:
                first = np.array(self.first)
                self.start_level = float(np.median(first))
                mad = float(np.median(np.abs(first - self.start_level))) * 1.4826
                self.start_noise = 1.25 * mad / math.sqrt(len(first))
                self.first = []
        if step < self.next_eval or progress is None:
            return None
        elapsed = step - self.seg_start
        self.next_eval = step + max(self.config.plateau_min_steps // 10, self.gap, elapsed // 100)
        return self._evaluate(step, progress)

    # the decision -------------------------------------------------------------------------
    def _recent(self, since: int) -> tuple[np.ndarray, np.ndarray]:
        xs: list[int] = []
        ys: list[float] = []
        for s, v in reversed(self.recent):
            if s < since:
                break
            xs.append(s)
            ys.append(v)
        return np.array(xs[::-1], dtype=float), np.array(ys[::-1], dtype=float)

    def _evaluate(self, step: int, progress: float) -> Finding | None:
        c = self.config
        seg = self.seg_start if self.seg_start is not None else step
        window = self._window()
        if step - seg < window + c.plateau_min_steps // 2:
            return None
        recent = self.recent
        while recent and recent[0][0] < step - 2 * window:
            recent.popleft()
        xs, ys = self._recent(step - window)
        if len(xs) < _MIN_WINDOW_SAMPLES:
            return None
        med = float(np.median(ys))
        mad = float(np.median(np.abs(ys - med))) * 1.4826
        if mad > 0:
            ys = np.clip(ys, med - 4 * mad, med + 4 * mad)
        xc = xs - xs.mean()
        sxx = float((xc * xc).sum())
        if sxx <= 0:
            return None
        level = float(ys.mean())
        slope = float((xc * (ys - level)).sum()) / sxx
        resid = ys - level - slope * xc
        sigma = math.sqrt(max(float((resid * resid).sum()) / max(len(ys) - 2, 1), 1e-24))
        se = sigma / math.sqrt(sxx)
        scale = max(abs(level), 1e-6)
        observed_drop = -slope * window

        if self.active:
            if level < self.episode_level - max(2 * c.stall_min_improvement * scale, 3 * sigma / math.sqrt(len(ys))):
                self.active = False
                self.hits = 0
            return None

        rule = None
        predicted_drop = 0.0
        rising = slope > 2.0 * se
        if self.start_level is not None and not rising:
            improvement = self.start_level - level
            se_improvement = math.sqrt(self.start_noise**2 + sigma * sigma / len(ys))
            if (
                step - seg >= 0.1 * (self.max_steps or 0)
                and improvement < c.stall_min_improvement * max(abs(self.start_level), 1e-6)
                and improvement < 3.0 * se_improvement
                and observed_drop < 0.5 * c.stall_min_improvement * scale
            ):
                rule = "stall"
        if rule is None and not rising:
            predicted_drop = self._predicted_drop(step, window)
            if predicted_drop >= c.plateau_min_drop * scale:
                pred_slope = -predicted_drop / window
                if slope - pred_slope >= c.plateau_z * se and observed_drop < predicted_drop / 3.0:
                    rule = "model"
        self.last_eval = {"step": step, "level": level, "slope": slope, "se": se,
                          "predicted_drop": predicted_drop, "rule": rule}
        if rule is None:
            self.hits = 0
            return None
        self.hits += 1
        if self.hits < 2:
            return None
        self.active = True
        self.episode_level = level
        onset = self._onset(level, sigma, scale, step - window)
        total = self.max_steps
        where = f"{100 * progress:.0f}% of {total} steps" if total else f"{100 * progress:.0f}% of training"
        if rule == "model":
            why = (
                f"the decay fitted to steps {seg}-{step - window} predicts a further drop of "
                f"{fmt(predicted_drop)} over the last {window} steps, but it fell {fmt(observed_drop)}"
            )
        else:
            why = (
                f"it has not improved beyond {100 * c.stall_min_improvement:g}% of its starting level "
                f"{fmt(self.start_level or 0.0)} (now {fmt(level)}, {fmt(observed_drop)} in the last {window} steps)"
            )
        return Finding(
            reason=Reason.EARLY_CONVERGENCE,
            severity=Severity.WARNING,
            step=step,
            onset_step=onset,
            message=(
                f"Early convergence at step {step} ({where}): loss flat at {fmt(level)}; {why}; onset {onset}."
            ),
            evidence={
                "rule": rule, "level": level, "slope": slope, "slope_se": se, "window": window,
                "predicted_drop": predicted_drop, "observed_drop": observed_drop,
                "start_level": self.start_level, "progress": progress,
            },
            detector=self.name,
        )

    def _predicted_drop(self, step: int, window: int) -> float:
        """How much the curve before the window says the loss should fall across it."""
        seg = self.seg_start or 0
        end = step - window
        rows = [b for b in self.bins.bins if b[1] / b[3] < end]
        if len(rows) < 6 or end - seg < self.config.plateau_min_steps // 2:
            return 0.0
        arr = np.array(rows, dtype=float)
        x = arr[:, 1] / arr[:, 3] - seg
        y = arr[:, 2] / arr[:, 3]
        fits = fit_decay(x, y, arr[:, 3])
        if not fits:
            return 0.0
        best = min(f.sse for f in fits.values())
        drops = [
            float(f.predict(end - seg)) - float(f.predict(step - seg))
            for f in fits.values()
            if f.sse <= 1.5 * best + 1e-18
        ]
        return max(min(drops), 0.0)

    def _onset(self, level: float, sigma: float, scale: float, window_start: int) -> int:
        onset = window_start
        tol_floor = 0.01 * scale
        for _, s, v, n in reversed(self.bins.bins):
            mean = v / n
            if mean > level + max(3 * sigma / math.sqrt(n), tol_floor):
                break
            onset = int(s / n)
        return min(onset, window_start)

    # rollback and persistence -------------------------------------------------------------
    def reset_after_rollback(self, step: int) -> None:
        self.seg_start = None
        self.active = False
        self.hits = 0
        self.last_lr = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "max_steps": self.max_steps,
            "num_train_epochs": self.num_train_epochs,
            "bins": self.bins.state_dict(),
            "recent": [list(p) for p in self.recent],
            "seg_start": self.seg_start,
            "first": list(self.first),
            "start_level": self.start_level,
            "start_noise": self.start_noise,
            "last_lr": self.last_lr,
            "last_step": self.last_step,
            "gap": self.gap,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch": self.epoch,
            "next_eval": self.next_eval,
            "hits": self.hits,
            "active": self.active,
            "episode_level": self.episode_level,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_steps = state["max_steps"]
        self.num_train_epochs = state["num_train_epochs"]
        self.bins.load_state_dict(state["bins"])
        self.recent = deque(((int(s), float(v)) for s, v in state["recent"]), maxlen=_MAX_RECENT)
        self.seg_start = state["seg_start"]
        self.first = [float(v) for v in state["first"]]
        self.start_level = state["start_level"]
        self.start_noise = float(state["start_noise"])
        self.last_lr = state["last_lr"]
        self.last_step = state["last_step"]
        self.gap = int(state["gap"])
        self.steps_per_epoch = state["steps_per_epoch"]
        self.epoch = state["epoch"]
        self.next_eval = int(state["next_eval"])
        self.hits = int(state["hits"])
        self.active = bool(state["active"])
        self.episode_level = float(state["episode_level"])

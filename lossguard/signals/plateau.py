"""Early convergence: the loss has stopped improving long before the run is over."""

from __future__ import annotations

import math
from collections import deque
from itertools import chain
from typing import Any

import numpy as np

from lossguard.config import DetectionConfig
from lossguard.numbers import fmt
from lossguard.records import Columns, Finding, Reason, Sample, Severity
from lossguard.signals import plateau_batch
from lossguard.signals.decay import fit_kink
from lossguard.signals.references import References
from lossguard.signals.stats import StepBins

_MAX_RECENT = 50_000
_MIN_WINDOW_SAMPLES = 5
_STALL_BURN = 0.1
_REFERENCE_SHARE = 0.2  # the reference rule's stretch: at most this share of a planned run ...
_REFERENCE_MIN_STEPS = 20  # ... and at least this many steps


def _median(a: np.ndarray) -> float:
    """``np.median`` of a non-empty 1-d array, without its overhead (called many times per check)."""
    n = len(a)
    k = n // 2
    if n % 2:
        return float(np.partition(a, k)[k])
    p = np.partition(a, (k - 1, k))
    return 0.5 * (float(p[k - 1]) + float(p[k]))


_LEVELS = {
    "unigram": "the entropy of the label tokens: a model that ignores its inputs",
    "uniform": "ln of the vocabulary or class count: a model that predicts all alike",
}


class PlateauDetector:
    """A premature plateau: flat loss early in the run, where the curve says it should still fall.

    "No improvement for N steps" fires on epoch staircases, on long slow decays and on noise.
    This detector instead, every few steps while the run is in its first ``early_fraction``
    (progress from ``max_steps``, or epochs), fires on either of:

    - **stall**: the run never got going. A weighted line through the binned curve since the
      segment began (and, failing that, since its first tenth, so a wild first few steps do not
      pass for a fall; after an early rise, from where it first reached its top) shows, with
      ``stall_z`` standard errors of confidence, less fall than a slow healthy decay's
      ``stall_rate`` of the loss per step (at most ``stall_min_improvement``). A too-high
      learning rate stuck at the uniform-prediction loss looks like this.
    - **model** (a change-point test): the curve since the segment began is fitted twice, by
      the best decay (exponential or power law with a free asymptote, see ``decay.py``) and by
      the best "decay until an onset, flat since" over every onset that leaves at least 50
      steps after it (at least one epoch once past the first, so a staircase's drop falls
      inside the flat stretch). The flat-since fit must explain the data better by
      ``plateau_z`` standard errors (noise from successive differences, or the fit's own
      scatter where the model fits worse than that), its decay must predict a drop that
      matters (>= ``plateau_min_drop`` of the loss) since the onset, and the values since must
      have fallen less than a third of it. Because the no-plateau fit sees all the data, a
      healthy curve that merely slows down more than its early part suggested is explained by
      it and does not fire.

    A change-point test far from firing (z under half of ``plateau_z``) skips its next check:
    on a healthy run it runs at about half the checks (it is the detector's main cost), and on
    the benchmark 8 of 990 findings came one check later, none were lost or added.

    Two consecutive positive checks are needed. The onset is where the smoothed curve first
    came within noise of the plateau level. A segment restarts when the learning rate rises
    (restarts; a warmup keeps the stall rule's start, and the stall rule judges during it) and
    after a rollback. One finding per plateau; it re-arms when the loss drops again.
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
        # the stall rule's curve: the same as ``bins`` (shared, not kept twice) until a warmup
        # restart clears ``bins`` but keeps the stall rule's start
        self.stall_bins = StepBins(64)
        self.stall_shared = True
        self.stall_start: int | None = None
        self.lr_fell = False
        self.recent: deque[tuple[int, float]] = deque(maxlen=_MAX_RECENT)
        self.seg_start: int | None = None
        self.last_lr: float | None = None
        self.last_step: int | None = None
        self.gap = 1
        self.steps_per_epoch: float | None = None
        self.epoch: float | None = None
        self.next_eval = 0
        self.hits = 0
        self.kink_rest = False  # skip the next change-point test: the last one was far from firing
        self.active = False
        self.episode_level = 0.0
        self.last_eval: dict[str, Any] = {}
        # the no-learning levels (``references.py``): set by the integration, not state
        self.references = References()

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
        return w

    def _restart(self, step: int, *, warmup: bool = False) -> None:
        # a warmup ramp restarts the decay fit, but a run that has been flat since before the
        # warmup ended has been flat all along: the stall rule keeps its start
        if not warmup or self.stall_start is None:
            self.stall_start = step
            self.stall_bins.clear()
            self.stall_shared = True
            # the raw values, the pending hit and the cadence belong to the stall rule's
            # stretch, which a warmup does not end
            self.recent.clear()
            self.hits = 0
            self.next_eval = step
        elif self.stall_shared:
            self.stall_bins.load_state_dict(self.bins.state_dict())
            self.stall_shared = False
        self.lr_fell = False
        self.seg_start = step
        self.kink_rest = False
        self.bins.clear()

    # streaming ----------------------------------------------------------------------------
    def update(self, sample: Sample) -> Finding | None:
        loss = sample.loss
        if loss is None or not math.isfinite(loss):
            return None
        lr, epoch = sample.lr, sample.epoch  # a NaN is a missing value, as in the batch path
        return self._update(sample.step, loss, None if lr != lr else lr, None if epoch != epoch else epoch)

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
                self._restart(step, warmup=not self.lr_fell)
            elif self.last_lr is not None and lr < self.last_lr * (1.0 - 1e-9):
                self.lr_fell = True
            self.last_lr = lr
        if self.seg_start is None:
            self._restart(step)

    def update_many(self, columns: Columns) -> list[tuple[int, Finding]]:
        """``update`` over a stretch of steps; (row, finding) pairs, same results (see
        ``signals/plateau_batch.py``)."""
        return plateau_batch.update_many(self, columns)

    def _update(self, step: int, loss: float, lr: float | None, epoch: float | None) -> Finding | None:
        self._track(step, lr, epoch)
        progress = self.progress(step)
        if progress is not None and progress > self.config.early_fraction and not self.active:
            return None
        self.bins.push(step, loss)
        if not self.stall_shared:
            self.stall_bins.push(step, loss)
        self.recent.append((step, loss))
        if step < self.next_eval or progress is None:
            return None
        elapsed = step - self.seg_start
        self.next_eval = step + max(self.config.plateau_min_steps // 10, self.gap, elapsed // 100)
        return self._evaluate(step, progress)

    # the decision -------------------------------------------------------------------------
    def _recent(self, since: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.recent:
            return np.zeros(0), np.zeros(0)
        arr = np.fromiter(chain.from_iterable(self.recent), dtype=float, count=2 * len(self.recent)).reshape(-1, 2)
        k = int(np.searchsorted(arr[:, 0], since))
        return arr[k:, 0], arr[k:, 1]

    def _min_window(self) -> int:
        """The shortest stretch a plateau is judged on: 50 steps, and at least 3 logged values."""
        return max(self.config.plateau_min_steps // 2, 3 * self.gap)

    @staticmethod
    def _noise(ys: np.ndarray) -> float:
        """Per-value noise of the loss, from second differences (a trend, even a bending one,
        barely moves them; first differences counted a sparse log's change of slope at a
        plateau's onset as noise, which hid the plateau).

        Differences beyond 4 robust sigmas are clipped so spikes do not widen the band, but the
        tails of heavy-tailed noise still count (a pure MAD would understate them).
        """
        d = np.diff(ys, 2)
        if len(d) < 2:
            return 0.0
        med = _median(d)
        s0 = 1.4826 * _median(np.abs(d - med))
        if s0 > 0:
            d = np.clip(d, med - 4 * s0, med + 4 * s0)
        return float(np.std(d)) / math.sqrt(6.0)

    def _evaluate(self, step: int, progress: float) -> Finding | None:
        c = self.config
        seg = self.seg_start if self.seg_start is not None else step
        stall_start = self.stall_start if self.stall_start is not None else seg
        w_min = self._min_window()
        window = self._window()
        recent = self.recent
        while recent and recent[0][0] < step - 4 * window:
            recent.popleft()
        xs, ys = self._recent(max(step - 4 * window, stall_start))
        shortest = min(w_min, self._reference_window()) if self.references.levels else w_min
        if len(xs) < _MIN_WINDOW_SAMPLES or step - stall_start < shortest:
            return None
        # while a warmup keeps restarting the decay fit's segment, only the stall rule, from
        # its own start, can judge: a run flat from step 0 need not wait for the warmup's end
        k = int(np.searchsorted(xs, seg))
        young = len(xs) - k < _MIN_WINDOW_SAMPLES or step - seg < w_min
        if not young:
            xs, ys = xs[k:], ys[k:]
        sigma = max(self._noise(ys), 1e-12)
        tail = xs >= step - w_min
        level = float(np.mean(ys[tail]))
        scale = max(abs(level), 1e-6)

        if self.active:
            n_tail = int(tail.sum())
            if level < self.episode_level - max(2 * c.stall_min_improvement * scale, 3 * sigma / math.sqrt(n_tail)):
                self.active = False
                self.hits = 0
            return None

        hit = self._at_reference(step, stall_start, sigma)
        if hit is None:
            hit = self._stall(step, stall_start, sigma, len(ys))
        if hit is None and not young:
            if self.kink_rest:
                self.kink_rest = False
            else:
                hit = self._kink(step, seg, xs, ys, sigma, window, w_min)
        self.last_eval = {"step": step, "level": level, "sigma": sigma, "rule": hit["rule"] if hit else None}
        if hit is None:
            self.hits = 0
            return None
        self.hits += 1
        if self.hits < 2:
            return None
        self.active = True
        self.episode_level = hit["level"]
        onset = self._onset(hit["level"], sigma, scale, hit["start"], seg)
        total = self.max_steps
        where = f"{100 * progress:.0f}% of {total} steps" if total else f"{100 * progress:.0f}% of training"
        if hit["rule"] == "reference":
            why = (
                f"for the last {step - hit['start']} steps it has not been more than "
                f"{100 * self.config.reference_tolerance:.0f}% below the {hit['reference']} level "
                f"{fmt(hit['reference_level'])} ({_LEVELS[hit['reference']]}), and fell {fmt(hit['observed_drop'])}"
            )
        elif hit["rule"] == "model":
            why = (
                f"the decay fitted to steps {seg}-{hit['start']} predicts a further drop of "
                f"{fmt(hit['predicted_drop'])} over the last {step - hit['start']} steps, but it fell "
                f"{fmt(hit['observed_drop'])} (z {hit['z']:.1f})"
            )
        else:
            drop = hit["observed_drop"]
            moved = f"fell only {fmt(drop)}" if drop >= 0 else f"rose {fmt(-drop)}"
            why = (
                f"it {moved} in the {step - hit['start']} steps since step {hit['start']}, where even a slow "
                f"healthy decay would have fallen {fmt(hit['needed'])} (noise of {fmt(sigma)} per value allowed for)"
            )
        return Finding(
            reason=Reason.EARLY_CONVERGENCE,
            severity=Severity.WARNING,
            step=step,
            onset_step=onset,
            message=(
                f"Early convergence at step {step} ({where}): loss flat at {fmt(hit['level'])}; {why}; onset {onset}."
            ),
            evidence={
                "rule": hit["rule"], "level": hit["level"], "window": step - hit["start"],
                "predicted_drop": hit["predicted_drop"], "observed_drop": hit["observed_drop"],
                "z": hit["z"], "noise": sigma, "progress": progress,
                **({"reference": hit["reference"], "reference_level": hit["reference_level"]}
                   if "reference" in hit else {}),
            },
            detector=self.name,
        )

    def _reference_window(self) -> int:
        """The reference rule's stretch: ``plateau_min_steps``, or in a short run a fifth of it
        (the evidence is the level, not the length: it must be judged within the early part)."""
        window = self.config.plateau_min_steps
        if self.max_steps:
            window = min(window, max(_REFERENCE_MIN_STEPS, int(_REFERENCE_SHARE * self.max_steps)))
        return window

    def _at_reference(self, step: int, start: int, sigma: float) -> dict[str, Any] | None:
        """The loss has sat at a no-learning level (unigram or uniform, ``references.py``) for
        ``plateau_min_steps``: whatever the curve's shape, the model has learned nothing from its
        inputs. Values above the level count as at it (a spike is no progress), and the level
        must not be falling by more than half the tolerance over the stretch. In a short run the
        stretch is a fifth of it (at least 20 steps), so it can be judged within its early part."""
        c = self.config
        levels = self.references.levels
        window = self._reference_window()
        if not levels or step - start < window:
            return None
        xs, ys = self._recent(step - window)
        if len(ys) < _MIN_WINDOW_SAMPLES:
            return None
        level = float(np.mean(ys))
        found = self.references.nearest(level, c.reference_tolerance)
        if found is None:
            return None
        name, ref = found
        tol = c.reference_tolerance * ref
        if float(np.mean(np.minimum(ys, ref))) < ref - tol:
            return None
        at = np.minimum(ys, ref)  # the fall from above the level down to it is no progress either
        xc = xs - xs.mean()
        sxx = float((xc * xc).sum())
        drop = -float((xc * (at - at.mean())).sum()) / sxx * (xs[-1] - xs[0]) if sxx > 0 else 0.0
        if drop > 0.5 * tol:
            return None  # still leaving the level: a run from scratch passes through it
        return {"rule": "reference", "level": level, "start": int(xs[0]), "predicted_drop": 0.0,
                "observed_drop": drop, "z": 0.0, "needed": 0.0, "reference": name, "reference_level": ref}

    def _stall(self, step: int, seg: int, sigma: float, n_noise: int) -> dict[str, Any] | None:
        """The run never got going: since the segment began the loss has not fallen by even a
        slow healthy decay's share, with confidence (a linear fit over the whole segment).

        Judged on the whole segment and, failing that, without its first tenth: a few wild
        first steps (a spike at step 3, an early bump) would otherwise pass for a fall.
        """
        span = step - seg
        bins = self.bins.bins if self.stall_shared else self.stall_bins.bins
        if span < self.config.plateau_min_steps // 2 or len(bins) < 4:
            return None
        arr = np.array(bins, dtype=float)
        hit = self._stall_from(step, seg, arr, sigma, n_noise)
        if hit is None:
            start = seg + int(_STALL_BURN * span)
            later = arr[arr[:, 1] / arr[:, 3] >= start]
            if len(later) < len(arr):
                hit = self._stall_from(step, start, later, sigma, n_noise)
        return hit

    def _stall_from(self, step: int, start: int, arr: np.ndarray, sigma: float,
                    n_noise: int) -> dict[str, Any] | None:
        c = self.config
        if len(arr) < 4:
            return None
        n = arr[:, 3]
        x = arr[:, 1] / n
        span = step - start
        y = arr[:, 2] / n
        line = self._line(x, y, n, sigma)
        if sigma > 0 and line is not None:
            # clip bin means to 4 sigma of their own precision around the line, so a spike does
            # not tilt it (clipping around the median instead would flatten any clean trend)
            xm = float((n * x).sum() / n.sum())
            fit = line[2] + line[0] * (x - xm)
            lim = 4 * sigma / np.sqrt(n) + 4 * sigma
            y = fit + np.clip(y - fit, -lim, lim)
            line = self._line(x, y, n, sigma)
        if line is None:
            return None
        if line[0] > 2.0 * line[1]:
            # it rose first (a too-high learning rate knocks the loss up, then it sits there):
            # judge the stretch from where it first came within noise of its highest point
            near = y >= float(y.max()) - 3.0 * sigma / np.sqrt(n)
            top = int(np.argmax(near))
            if len(y) - top < 4 or step - x[top] < c.plateau_min_steps // 2:
                return None
            x, y, n = x[top:], y[top:], n[top:]
            span = step - int(x[0])
            line = self._line(x, y, n, sigma)
            if line is None or line[0] > 2.0 * line[1]:
                return None
        slope, se, ym = line
        scale = max(abs(ym), 1e-6)
        needed = min(c.stall_rate * span, c.stall_min_improvement) * scale
        drop = -slope * span
        # the noise comes from only ``n_noise`` values: a sparse log's first checks widen the margin
        # as the change-point test does
        if drop + c.stall_z * math.sqrt(1.0 + 4.0 / n_noise) * se * span >= needed:
            return None
        return {"rule": "stall", "level": ym, "start": step - span, "predicted_drop": 0.0, "observed_drop": drop,
                "z": (needed - drop) / max(se * span, 1e-24), "needed": needed}

    @staticmethod
    def _line(x: np.ndarray, y: np.ndarray, n: np.ndarray, sigma: float) -> tuple[float, float, float] | None:
        """Weighted least-squares line through bin means: (slope, its standard error, mean)."""
        xm = float((n * x).sum() / n.sum())
        ym = float((n * y).sum() / n.sum())
        sxx = float((n * (x - xm) ** 2).sum())
        if sxx <= 0:
            return None
        slope = float((n * (x - xm) * (y - ym)).sum()) / sxx
        return slope, sigma / math.sqrt(sxx), ym

    def _kink_data(self, step: int, seg: int, xs: np.ndarray, ys: np.ndarray,
                   sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The segment's curve for a fit: complete old bins, then the raw recent values (clipped
        to 4 sigma of a running median, so a spike cannot bend the fit) in bins of ~1/24 of
        their span. x is steps since the segment began; weights are value counts."""
        r0 = float(xs[0])
        b = self.bins
        rows = [r for r in b.bins if b.origin is not None and b.origin + (r[0] + 1) * b.width <= r0]
        if len(ys) >= 9 and float(np.abs(np.diff(ys)).max()) > 4 * sigma:
            # only where some value jumps: the running median costs more than the rest of the fit
            pad = np.concatenate([np.full(4, ys[0]), ys, np.full(4, ys[-1])])
            med = np.partition(np.lib.stride_tricks.sliding_window_view(pad, 9), 4, axis=1)[:, 4]  # running median
            ys = np.clip(ys, med - 4 * sigma, med + 4 * sigma)
        width = max(float(self.gap), (step - r0 + 1) / 24.0)
        idx = ((xs - r0) // width).astype(np.int64)
        cnt = np.bincount(idx).astype(float)
        keep = cnt > 0
        rx = np.bincount(idx, weights=xs)[keep] / cnt[keep]
        ry = np.bincount(idx, weights=ys)[keep] / cnt[keep]
        if rows:
            old = np.array(rows, dtype=float)
            x = np.concatenate([old[:, 1] / old[:, 3], rx])
            y = np.concatenate([old[:, 2] / old[:, 3], ry])
            w = np.concatenate([old[:, 3], cnt[keep]])
        else:
            x, y, w = rx, ry, cnt[keep]
        return x - seg, y, w

    def _kink(self, step: int, seg: int, xs: np.ndarray, ys: np.ndarray, sigma: float, window: int,
              w_min: int) -> dict[str, Any] | None:
        """The curve is better explained by "a decay until some onset, flat since" than by any
        decay through all of it, by ``plateau_z`` standard errors, and the decay says the loss
        had a drop that matters still to come."""
        c = self.config
        now = step - seg
        last = now - w_min
        if self.epoch is not None and self.epoch >= 1.0 and self.steps_per_epoch:
            last = min(last, now - window)  # a staircase's epoch drop must fall inside the flat stretch
        if last < c.plateau_min_steps // 2:
            return None  # no onset can have both enough decay before it and enough flat after it
        x, y, w = self._kink_data(step, seg, xs, ys, sigma)
        fit = fit_kink(x, y, w, (x >= c.plateau_min_steps // 2) & (x <= last))
        z = math.sqrt(fit.gain / max(sigma * sigma, fit.sse / max(len(x) - 4, 1))) if fit is not None and fit.gain > 0 else 0.0
        # far from firing (the evidence would have to quadruple before the check after next):
        # the next check is left out, which halves the cost of this test on a healthy run
        self.kink_rest = z < 0.5 * c.plateau_z
        if fit is None or z == 0.0:
            return None
        n_post = int((xs >= fit.tau + seg).sum())
        if z < c.plateau_z * math.sqrt(1.0 + 4.0 / max(n_post, 1)):
            return None
        d = fit.decay
        level = float(d.predict(fit.tau))
        scale = max(abs(level), 1e-6)
        predicted_drop = level - float(d.predict(now))
        if predicted_drop < c.plateau_min_drop * scale:
            return None
        if level - predicted_drop < min(0.0, float(np.min(ys))):
            return None  # a decay heading below zero (for a loss that never went there) is no evidence
        post = xs >= fit.tau + seg
        px, py = xs[post], ys[post]
        xc = px - px.mean()
        sxx = float((xc * xc).sum())
        observed_drop = -float((xc * (py - py.mean())).sum()) / sxx * (step - fit.tau - seg) if sxx > 0 else 0.0
        if observed_drop > predicted_drop / 3.0:
            return None
        return {"rule": "model", "level": level, "start": int(round(fit.tau)) + seg, "predicted_drop": predicted_drop,
                "observed_drop": observed_drop, "z": z, "needed": 0.0}

    def _onset(self, level: float, sigma: float, scale: float, window_start: int, seg: int) -> int:
        """Where the smoothed curve first came within noise of the plateau level."""
        onset = window_start
        tol_floor = 0.01 * scale
        for _, s, v, n in reversed(self.bins.bins):
            mean = v / n
            if mean > level + max(3 * sigma / math.sqrt(n), tol_floor):
                break
            onset = int(s / n)
        return max(min(onset, window_start), seg)

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
            "stall_bins": self.stall_bins.state_dict(),
            "stall_shared": self.stall_shared,
            "stall_start": self.stall_start,
            "lr_fell": self.lr_fell,
            "recent": [list(p) for p in self.recent],
            "seg_start": self.seg_start,
            "last_lr": self.last_lr,
            "last_step": self.last_step,
            "gap": self.gap,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch": self.epoch,
            "next_eval": self.next_eval,
            "hits": self.hits,
            "kink_rest": self.kink_rest,
            "active": self.active,
            "episode_level": self.episode_level,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_steps = state["max_steps"]
        self.num_train_epochs = state["num_train_epochs"]
        self.bins.load_state_dict(state["bins"])
        self.stall_bins.load_state_dict(state["stall_bins"])
        self.stall_shared = bool(state["stall_shared"])
        self.stall_start = state["stall_start"]
        self.lr_fell = bool(state["lr_fell"])
        self.recent = deque(((int(s), float(v)) for s, v in state["recent"]), maxlen=_MAX_RECENT)
        self.seg_start = state["seg_start"]
        self.last_lr = state["last_lr"]
        self.last_step = state["last_step"]
        self.gap = int(state["gap"])
        self.steps_per_epoch = state["steps_per_epoch"]
        self.epoch = state["epoch"]
        self.next_eval = int(state["next_eval"])
        self.hits = int(state["hits"])
        self.kink_rest = bool(state.get("kink_rest", False))
        self.active = bool(state["active"])
        self.episode_level = float(state["episode_level"])

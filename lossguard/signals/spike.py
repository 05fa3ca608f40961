"""Loss spikes and gradient-norm explosions against a robust rolling baseline."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from lossguard.config import DetectionConfig
from lossguard.numbers import fmt
from lossguard.records import Finding, Reason, Sample, Severity
from lossguard.signals.base import Columns
from lossguard.signals.stats import (
    iqr_sigma_rows,
    iqr_sigma_sorted,
    level_due,
    median_sorted,
    median_sorted_rows,
    scale_due,
)

_BASELINE = 16
# the noise of one value, from the spread of differences of neighbours (trend cancels out)
_DIFF_TO_SIGMA = 1.0 / 1.4142135623730951
_MIN_WARM = 6
# from this many values on, level_due is every 4th count and scale_due every 16th (stats.py)
_FIXED_SCHEDULE = 128


def warm_samples(config: DetectionConfig, gap: int) -> int:
    """Values a baseline needs before it judges: ``min_history`` steps' worth, at least 6 values.

    A sparse log (``logging_steps`` > 1) logs means over many steps, so fewer values suffice.
    """
    return max(_MIN_WARM, config.min_history // max(gap, 1))


def _tail_pick(n: int) -> int:
    return n // 50


class SpikeDetector:
    """A loss far above the recent baseline: a bad batch or the start of a blow-up.

    The baseline is the median of the last 16 values (the current one excluded; short, so a
    falling curve does not leave it behind). A spike must clear three yardsticks at once:
    ``spike_sigmas`` robust sigmas of the noise (from the IQR of the last ``spike_window``
    step-to-step differences / sqrt(2), so the trend cancels out); ``spike_min_rise`` of the
    baseline (a material rise); and ``spike_tail_factor`` times the largest drops the noise itself
    has produced lately (a high quantile of the falling differences). The last one is what keeps
    heavy-tailed noise from counting: noise throws values both ways, a spike only goes up, so a
    rise that the noise has already matched downwards is not a spike.

    Baselines are refreshed every 4 values (spreads every 16) once the windows are full; between
    refreshes the threshold is a constant. One finding per run of consecutive spiking samples;
    ``spike_score`` is the share of samples that spiked.
    """

    name = "spike"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.values: deque[float] = deque(maxlen=self.config.spike_window + 1)
        self.m = 0
        self.first_step: int | None = None
        self.gap = 1
        self.median = 0.0
        self.sigma = 0.0
        self.tail = 0.0
        self.threshold: float | None = None
        self.in_loss_spike = False
        self.n = 0
        self.n_spikes = 0

    @property
    def loss_window(self) -> list[float]:
        """The values the baseline median is taken over (the last 16)."""
        v = self.values
        return list(v)[-_BASELINE:]

    @property
    def spike_score(self) -> float:
        """Share of samples whose loss spiked (0 for a clean run)."""
        return self.n_spikes / self.n if self.n else 0.0

    @property
    def steady(self) -> bool:
        """Whether the batch path applies: window full, warm, refreshes on the fixed schedule."""
        m = self.m
        return m > self.config.spike_window and m >= _FIXED_SCHEDULE and m >= warm_samples(self.config, self.gap)

    def _threshold(self, med: float, sigma: float, tail: float) -> float:
        c = self.config
        scale = abs(med)
        return med + max(c.spike_sigmas * max(sigma, 1e-3 * scale), c.spike_min_rise * scale,
                         self._tail_factor() * tail)

    def _tail_factor(self) -> float:
        # a sparse log's values are means over many steps (light tails), and its window spans so
        # many steps that the trend, not the noise, would set the largest drops
        return self.config.spike_tail_factor if self.gap == 1 else 0.0

    def _finding(self, step: int, loss: float, threshold: float, med: float, sigma: float, tail: float,
                 score: float) -> Finding:
        c = self.config
        return Finding(
            reason=Reason.SPIKE,
            severity=Severity.WARNING,
            step=step,
            onset_step=step,
            message=(
                f"Loss spike at step {step}: {fmt(loss)} > {fmt(threshold)} (median {fmt(med)} of the last "
                f"{_BASELINE} samples + the largest of {c.spike_sigmas:g} sigma of {fmt(sigma)}, "
                f"{100 * c.spike_min_rise:g}% of the median, {c.spike_tail_factor:g}x the noise's largest "
                f"drops {fmt(tail)})."
            ) if self.gap == 1 else (
                f"Loss spike at step {step}: {fmt(loss)} > {fmt(threshold)} (median {fmt(med)} of the last "
                f"{_BASELINE} samples + the larger of {c.spike_sigmas:g} sigma of {fmt(sigma)} and "
                f"{100 * c.spike_min_rise:g}% of the median)."
            ),
            evidence={"loss": loss, "median": med, "sigma": sigma, "tail": tail, "threshold": threshold,
                      "spike_score": score},
            detector=self.name,
        )

    def update(self, sample: Sample) -> Finding | None:
        loss = sample.loss
        if loss is None or not math.isfinite(loss):
            return None
        step = sample.step
        self.n += 1
        finding = None
        thr = self.threshold
        if thr is not None:
            if loss > thr:
                self.n_spikes += 1
                if not self.in_loss_spike:
                    self.in_loss_spike = True
                    finding = self._finding(step, loss, thr, self.median, self.sigma, self.tail,
                                            self.n_spikes / self.n)
            else:
                self.in_loss_spike = False
        self._push(step, loss)
        return finding

    def _push(self, step: int, loss: float) -> None:
        self.values.append(loss)
        self.m += 1
        m = self.m
        if m == 1:
            self.first_step = step
        elif m == 2 and self.first_step is not None:
            self.gap = max(1, step - self.first_step)
        if not level_due(m):
            return
        vals = list(self.values)
        self.median = median_sorted(sorted(vals[-_BASELINE:]))
        if scale_due(m) and len(vals) >= 3:
            diffs = sorted(b - a for a, b in zip(vals[:-1], vals[1:]))
            self.sigma = iqr_sigma_sorted(diffs) * _DIFF_TO_SIGMA
            self.tail = max(median_sorted(diffs) - diffs[_tail_pick(len(diffs))], 0.0)
        if m >= warm_samples(self.config, self.gap):
            self.threshold = self._threshold(self.median, self.sigma, self.tail)

    def update_many(self, columns: Columns) -> list[tuple[int, Finding]]:
        """``update`` over a stretch of steps; (row, finding) pairs, same results."""
        steps, losses = columns.steps, columns.loss
        out: list[tuple[int, Finding]] = []
        idx = np.flatnonzero(np.isfinite(losses))
        k = 0
        while k < len(idx) and not self.steady:
            i = int(idx[k])
            f = self.update(Sample(step=int(steps[i]), loss=float(losses[i])))
            if f is not None:
                out.append((i, f))
            k += 1
        idx = idx[k:]
        if len(idx) == 0:
            return out
        y = losses[idx]
        n_new = len(y)
        prefix = np.array(self.values, dtype=float)
        ext = np.concatenate([prefix, y])
        m0 = self.m
        counts = np.arange(m0 + 1, m0 + n_new + 1)
        # steady: level_due is every 4th count, scale_due every 16th; value number ``count`` sits
        # at ext[len(prefix) + count - m0 - 1], so both refresh schedules are strided windows
        k0 = -(-(m0 + 1) // 4)
        ref = np.arange(4 * k0, m0 + n_new + 1, 4)
        pos0 = len(prefix) + 4 * k0 - m0 - 1
        base = min(_BASELINE, len(prefix))  # the streaming median sees at most the values it holds
        (med,) = _sorted_row_stats(_windows(ext, base, pos0, 4, len(ref)), median_sorted_rows)
        sig = np.full(len(ref), self.sigma)
        tail = np.full(len(ref), self.tail)
        sc = (ref % 16) == 0
        if sc.any():
            w = len(prefix) - 1
            first = int(np.argmax(sc))
            sig_s, tail_s = _sorted_row_stats(
                _windows(np.diff(ext), w, pos0 + 4 * first - 1, 16, int(sc.sum())),
                lambda d: iqr_sigma_rows(d) * _DIFF_TO_SIGMA,
                lambda d: np.maximum(median_sorted_rows(d) - d[:, _tail_pick(d.shape[1])], 0.0),
            )
            # carry each scale refresh forward to the level refreshes that follow it
            which = np.cumsum(sc) - 1
            has = which >= 0
            sig = np.where(has, sig_s[np.maximum(which, 0)], self.sigma)
            tail = np.where(has, tail_s[np.maximum(which, 0)], self.tail)
        c = self.config
        scale = np.abs(med)
        thr = med + np.maximum(np.maximum(c.spike_sigmas * np.maximum(sig, 1e-3 * scale), c.spike_min_rise * scale),
                               self._tail_factor() * tail)
        # threshold in force for value j: the last refresh at a count <= m0 + j
        r = (counts - 1) // 4 - k0
        have = r >= 0
        cur = self.threshold if self.threshold is not None else math.inf
        thr_j = np.where(have, thr[np.maximum(r, 0)] if len(ref) else cur, cur)  # no refresh among the new values
        exceed = y > thr_j
        prev = np.concatenate([[self.in_loss_spike], exceed[:-1]])
        starts = np.flatnonzero(exceed & ~prev)
        cum = np.cumsum(exceed)
        n0, s0 = self.n, self.n_spikes
        for j in starts.tolist():
            if r[j] >= 0:
                mj, sj, tj = float(med[r[j]]), float(sig[r[j]]), float(tail[r[j]])
            else:
                mj, sj, tj = self.median, self.sigma, self.tail
            score = (s0 + int(cum[j])) / (n0 + j + 1)
            out.append((int(idx[j]),
                        self._finding(int(steps[idx[j]]), float(y[j]), float(thr_j[j]), mj, sj, tj, score)))
        self.n = n0 + n_new
        self.n_spikes = s0 + int(cum[-1])
        self.in_loss_spike = bool(exceed[-1])
        self.values.extend(ext[-(c.spike_window + 1):].tolist())
        self.m = m0 + n_new
        if len(ref):
            self.median, self.sigma, self.tail = float(med[-1]), float(sig[-1]), float(tail[-1])
            self.threshold = float(thr[-1])
        return out

    def reset_after_rollback(self, step: int) -> None:
        self.in_loss_spike = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": list(self.values), "m": self.m, "first_step": self.first_step, "gap": self.gap,
            "median": self.median, "sigma": self.sigma, "tail": self.tail, "threshold": self.threshold,
            "in_loss_spike": self.in_loss_spike, "n": self.n, "n_spikes": self.n_spikes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = deque((float(v) for v in state["values"]), maxlen=self.config.spike_window + 1)
        self.m = int(state["m"])
        self.first_step = state["first_step"]
        self.gap = int(state["gap"])
        self.median = float(state["median"])
        self.sigma = float(state["sigma"])
        self.tail = float(state["tail"])
        self.threshold = None if state["threshold"] is None else float(state["threshold"])
        self.in_loss_spike = bool(state["in_loss_spike"])
        self.n = int(state["n"])
        self.n_spikes = int(state["n_spikes"])


class GradExplosionDetector:
    """A gradient norm many times its recent median: the update about to be applied is huge.

    Judged on log(grad norm) against the median and robust sigma of the last ``spike_window``
    values (current excluded, refreshed every 16 values once the window is full); it must also
    exceed ``grad_spike_ratio`` times the median. Clipping hides the damage from the loss for a
    while, so this often fires first.
    """

    name = "grad_explosion"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.values: deque[float] = deque(maxlen=self.config.spike_window)
        self.m = 0
        self.first_step: int | None = None
        self.gap = 1
        self.median = 0.0
        self.threshold: float | None = None
        self.in_grad_spike = False

    @property
    def steady(self) -> bool:
        """Whether the batch path applies: window full, warm, refreshes on the fixed schedule."""
        m = self.m
        return m >= self.config.spike_window and m >= _FIXED_SCHEDULE and m >= warm_samples(self.config, self.gap)

    def _threshold(self, med: float, sigma: float) -> float:
        c = self.config
        return med + max(c.spike_sigmas * max(sigma, 0.05), math.log(c.grad_spike_ratio))

    def _finding(self, step: int, gn: float, loss: float | None, med: float, threshold: float) -> Finding:
        base = math.exp(med)
        return Finding(
            reason=Reason.GRAD_EXPLOSION,
            severity=Severity.WARNING,
            step=step,
            onset_step=step,
            message=(
                f"Gradient norm explosion at step {step}: {fmt(gn)} is {gn / base:.1f}x the median "
                f"{fmt(base)} of the last {len(self.values)} samples (threshold {fmt(math.exp(threshold))})."
            ),
            evidence={"grad_norm": gn, "median": base, "threshold": math.exp(threshold), "loss": loss},
            detector=self.name,
        )

    def update(self, sample: Sample) -> Finding | None:
        gn = sample.grad_norm
        if gn is None or not math.isfinite(gn) or gn <= 0.0:
            return None
        lg = math.log(gn)
        finding = None
        thr = self.threshold
        if thr is not None:
            if lg > thr:
                if not self.in_grad_spike:
                    self.in_grad_spike = True
                    finding = self._finding(sample.step, gn, sample.loss, self.median, thr)
            else:
                self.in_grad_spike = False
        self._push(sample.step, lg)
        return finding

    def _push(self, step: int, lg: float) -> None:
        self.values.append(lg)
        self.m += 1
        m = self.m
        if m == 1:
            self.first_step = step
        elif m == 2 and self.first_step is not None:
            self.gap = max(1, step - self.first_step)
        if not scale_due(m) or m < 2:
            return
        s = sorted(self.values)
        self.median = median_sorted(s)
        if m >= warm_samples(self.config, self.gap):
            self.threshold = self._threshold(self.median, iqr_sigma_sorted(s))

    def update_many(self, columns: Columns) -> list[tuple[int, Finding]]:
        """``update`` over a stretch of steps; (row, finding) pairs, same results."""
        steps, grad_norms, losses = columns.steps, columns.grad_norm, columns.loss
        out: list[tuple[int, Finding]] = []
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(grad_norms) & (grad_norms > 0.0)
        idx = np.flatnonzero(ok)
        k = 0
        while k < len(idx) and not self.steady:
            i = int(idx[k])
            f = self.update(Sample(step=int(steps[i]), grad_norm=float(grad_norms[i]), loss=_opt(losses[i])))
            if f is not None:
                out.append((i, f))
            k += 1
        idx = idx[k:]
        if len(idx) == 0:
            return out
        # math.log, not np.log: the two may differ in the last bit, and the streaming path is the reference
        n_new = len(idx)
        lg = np.fromiter(map(math.log, grad_norms[idx].tolist()), dtype=float, count=n_new)
        prefix = np.array(self.values, dtype=float)
        ext = np.concatenate([prefix, lg])
        m0 = self.m
        counts = np.arange(m0 + 1, m0 + n_new + 1)
        # steady: scale_due is every 16th count; value number ``count`` is ext[len(prefix) + count - m0 - 1]
        k0 = -(-(m0 + 1) // 16)
        ref = np.arange(16 * k0, m0 + n_new + 1, 16)
        w = self.config.spike_window
        med, iqr_sigma = _sorted_row_stats(_windows(ext, w, len(prefix) + 16 * k0 - m0 - 1, 16, len(ref)),
                                           median_sorted_rows, iqr_sigma_rows)
        c = self.config
        thr = med + np.maximum(c.spike_sigmas * np.maximum(iqr_sigma, 0.05), math.log(c.grad_spike_ratio))
        r = (counts - 1) // 16 - k0
        cur = self.threshold if self.threshold is not None else math.inf
        thr_j = np.where(r >= 0, thr[np.maximum(r, 0)] if len(ref) else cur, cur)
        exceed = lg > thr_j
        prev = np.concatenate([[self.in_grad_spike], exceed[:-1]])
        for j in np.flatnonzero(exceed & ~prev).tolist():
            i = int(idx[j])
            mj = float(med[r[j]]) if r[j] >= 0 else self.median
            out.append((i, self._finding(int(steps[i]), float(grad_norms[i]), _opt(losses[i]), mj, float(thr_j[j]))))
        self.in_grad_spike = bool(exceed[-1])
        self.values.extend(ext[-w:].tolist())
        self.m = m0 + n_new
        if len(ref):
            self.median, self.threshold = float(med[-1]), float(thr[-1])
        return out

    def reset_after_rollback(self, step: int) -> None:
        self.in_grad_spike = False

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "m": self.m, "first_step": self.first_step, "gap": self.gap,
                "median": self.median, "threshold": self.threshold, "in_grad_spike": self.in_grad_spike}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = deque((float(v) for v in state["values"]), maxlen=self.config.spike_window)
        self.m = int(state["m"])
        self.first_step = state["first_step"]
        self.gap = int(state["gap"])
        self.median = float(state["median"])
        self.threshold = None if state["threshold"] is None else float(state["threshold"])
        self.in_grad_spike = bool(state["in_grad_spike"])


# Window rows are sorted a block at a time: the sorted copy stays in the CPU cache and its memory
# is reused, instead of hundreds of MB of fresh pages for a million-sample log.
_SORT_BLOCK_VALUES = 1 << 18


def _sorted_row_stats(rows: np.ndarray, *stats: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """Each of ``stats`` (row-sorted values -> one value per row) over the rows of ``rows``."""
    n = len(rows)
    out = [np.empty(n) for _ in stats]
    block = max(1, _SORT_BLOCK_VALUES // max(rows.shape[1], 1))
    for a in range(0, n, block):
        s = np.sort(rows[a:a + block], axis=1)
        for o, stat in zip(out, stats):
            o[a:a + block] = stat(s)
    return out


def _windows(values: np.ndarray, size: int, last: int, stride: int, count: int) -> np.ndarray:
    """Rows of ``size`` values ending at positions ``last``, ``last + stride``, ... (``count`` rows), as a view."""
    view = np.lib.stride_tricks.sliding_window_view(values, size)
    start = last - size + 1
    return view[start:start + stride * (count - 1) + 1:stride] if count else view[:0]


def _opt(v: float) -> float | None:
    f = float(v)
    return None if math.isnan(f) else f

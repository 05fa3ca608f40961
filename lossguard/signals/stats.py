"""Streaming statistics the detectors share: robust rolling level and spread, trend, smoothing.

Everything here is O(1) or O(log window) per value (amortised) and serialises to plain data, so
a detector built on it can be rolled back with the weights.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from typing import Any

# IQR of a standard normal: the spread of a rolling window in "sigmas" without letting the
# spikes we look for inflate the yardstick that measures them.
_IQR_TO_SIGMA = 1.0 / 1.3489795


def normal_cdf(z: float) -> float:
    """P(Z <= z) for a standard normal Z."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))



def raw_sums(points: Any, x0: float) -> tuple[float, float, float, float, float]:
    """(sum dx, sum y, sum dx^2, sum dx*y, sum y^2) with dx = x - x0: a least-squares fit's inputs."""
    sx = sy = sxx = sxy = syy = 0.0
    for x, y in points:
        dx = x - x0
        sx += dx
        sy += y
        sxx += dx * dx
        sxy += dx * y
        syy += y * y
    return sx, sy, sxx, sxy, syy

class RollingRobust:
    """Median and robust sigma (IQR / 1.349) of the last ``size`` values.

    A sorted copy of the window is kept beside the insertion order, so each push costs one
    bisect and one list shift of at most ``size`` elements (memmove, fast for hundreds).
    """

    def __init__(self, size: int) -> None:
        if size < 2:
            raise ValueError(f"size={size!r} must be >= 2")
        self.size = size
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._order)

    def push(self, value: float) -> None:
        """Add a finite value, dropping the oldest when the window is full."""
        self._order.append(value)
        insort(self._sorted, value)
        if len(self._order) > self.size:
            old = self._order.popleft()
            del self._sorted[bisect_left(self._sorted, old)]

    def quantile(self, q: float) -> float:
        s = self._sorted
        return s[int(q * (len(s) - 1) + 0.5)]

    def median(self) -> float:
        s = self._sorted
        n = len(s)
        mid = n // 2
        return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])

    def sigma(self) -> float:
        s = self._sorted
        n = len(s) - 1
        return (s[int(0.75 * n + 0.5)] - s[int(0.25 * n + 0.5)]) * _IQR_TO_SIGMA

    def clear(self) -> None:
        self._order.clear()
        self._sorted.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "values": list(self._order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = int(state["size"])
        self._order = deque(float(v) for v in state["values"])
        self._sorted = sorted(self._order)


class RollingRegression:
    """Least-squares line through the last ``size`` (x, y) points, with its uncertainty.

    Sums are kept relative to an origin that moves with the window and are recomputed from
    the points every ``size`` pushes, so rounding cannot build up over a long run.
    """

    def __init__(self, size: int) -> None:
        if size < 3:
            raise ValueError(f"size={size!r} must be >= 3")
        self.size = size
        self._pts: deque[tuple[float, float]] = deque()
        self._x0 = 0.0
        self._sx = self._sy = self._sxx = self._sxy = self._syy = 0.0
        self._since_rebuild = 0

    def __len__(self) -> int:
        return len(self._pts)

    def _rebuild(self) -> None:
        pts = self._pts
        self._x0 = pts[0][0] if pts else 0.0
        self._sx, self._sy, self._sxx, self._sxy, self._syy = raw_sums(pts, self._x0)
        self._since_rebuild = 0

    def push(self, x: float, y: float) -> None:
        pts = self._pts
        pts.append((x, y))
        dx = x - self._x0
        self._sx += dx
        self._sy += y
        self._sxx += dx * dx
        self._sxy += dx * y
        self._syy += y * y
        if len(pts) > self.size:
            ox, oy = pts.popleft()
            odx = ox - self._x0
            self._sx -= odx
            self._sy -= oy
            self._sxx -= odx * odx
            self._sxy -= odx * oy
            self._syy -= oy * oy
        self._since_rebuild += 1
        if self._since_rebuild >= self.size:
            self._rebuild()

    def fit(self) -> tuple[float, float, float]:
        """(slope, standard error of the slope, mean of y); slope 0 and se inf when undefined."""
        n = len(self._pts)
        if n < 3:
            return 0.0, math.inf, (self._sy / n if n else 0.0)
        sxx = self._sxx - self._sx * self._sx / n
        syy = self._syy - self._sy * self._sy / n
        sxy = self._sxy - self._sx * self._sy / n
        if sxx <= 0.0:
            return 0.0, math.inf, self._sy / n
        slope = sxy / sxx
        sse = max(syy - slope * sxy, 0.0)
        se = math.sqrt(sse / (n - 2) / sxx)
        return slope, se, self._sy / n

    def prob_increasing(self) -> float:
        """Probability that the underlying trend is rising (dlib's test, normal approximation)."""
        slope, se, _ = self.fit()
        if se == math.inf:
            return 0.5
        if se == 0.0:
            return 1.0 if slope > 0 else (0.0 if slope < 0 else 0.5)
        return normal_cdf(slope / se)

    def clear(self) -> None:
        self._pts.clear()
        self._rebuild()

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "points": [list(p) for p in self._pts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = int(state["size"])
        self._pts = deque((float(x), float(y)) for x, y in state["points"])
        self._rebuild()


class Ema:
    """Exponential moving average with bias correction (the first values are not pulled to 0)."""

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} is out of range; allowed (0, 1]")
        self.alpha = alpha
        self._acc = 0.0
        self._weight = 0.0

    @property
    def value(self) -> float | None:
        return self._acc / self._weight if self._weight else None

    def push(self, x: float) -> float:
        a = self.alpha
        self._acc = (1.0 - a) * self._acc + a * x
        self._weight = (1.0 - a) * self._weight + a
        return self._acc / self._weight

    def clear(self) -> None:
        self._acc = self._weight = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "acc": self._acc, "weight": self._weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = float(state["alpha"])
        self._acc = float(state["acc"])
        self._weight = float(state["weight"])


class StepBins:
    """A loss curve downsampled into at most ``max_bins`` equal-width step bins.

    When the bins run out, neighbours merge and the width doubles, so a million-step history
    is summarised by a few dozen points at O(1) amortised cost per value; the curve's shape is
    what a decay model is fitted to.
    """

    def __init__(self, max_bins: int = 64, width: int = 1) -> None:
        if max_bins < 4 or max_bins % 2:
            raise ValueError(f"max_bins={max_bins!r} must be an even number >= 4")
        self.max_bins = max_bins
        self.width = max(1, width)
        self.origin: int | None = None
        self.bins: list[list[float]] = []  # [bin index, sum of steps, sum of values, count]

    def __len__(self) -> int:
        return len(self.bins)

    def push(self, step: int, value: float) -> None:
        if self.origin is None:
            self.origin = step
        idx = (step - self.origin) // self.width
        bins = self.bins
        if bins and bins[-1][0] == idx:
            b = bins[-1]
            b[1] += step
            b[2] += value
            b[3] += 1
            return
        bins.append([idx, float(step), value, 1])
        if len(bins) > self.max_bins:
            self._merge()

    def push_many(self, steps: Any, values: Any) -> None:
        """``push`` of each (step, value) in turn, for non-decreasing integer ``steps`` (numpy
        arrays): the same bins to the last bit, since each bin's sums are accumulated in order
        (``np.cumsum`` adds one value at a time, as ``push`` does)."""
        import numpy as np

        n = len(steps)
        if n == 0:
            return
        if self.origin is None:
            self.origin = int(steps[0])
        xs = np.asarray(steps, dtype=np.int64)
        fx = xs.astype(float)
        vs = np.asarray(values, dtype=float)
        i = 0
        while i < n:
            idx = (xs[i:] - self.origin) // self.width
            cut = np.flatnonzero(idx[1:] != idx[:-1]) + 1
            starts = np.concatenate(([0], cut))
            ends = np.append(cut, len(idx))
            for a, b in zip(starts.tolist(), ends.tolist()):
                k = int(idx[a])
                bins = self.bins
                sx, sv = fx[i + a:i + b].copy(), vs[i + a:i + b].copy()
                if bins and bins[-1][0] == k:
                    last = bins[-1]
                    sx[0] += last[1]
                    sv[0] += last[2]
                    last[1] = float(np.cumsum(sx)[-1])
                    last[2] = float(np.cumsum(sv)[-1])
                    last[3] += b - a
                    continue
                if len(bins) == self.max_bins:
                    # this bin overflows: like ``push``, merge with only its first value in it,
                    # then bin the rest at the doubled width
                    bins.append([k, float(fx[i + a]), float(vs[i + a]), 1])
                    self._merge()
                    i += a + 1
                    break
                bins.append([k, float(np.cumsum(sx)[-1]), float(np.cumsum(sv)[-1]), b - a])
            else:
                return

    def _merge(self) -> None:
        self.width *= 2
        merged: list[list[float]] = []
        for idx, s, v, c in self.bins:
            j = int(idx) // 2
            if merged and merged[-1][0] == j:
                m = merged[-1]
                m[1] += s
                m[2] += v
                m[3] += c
            else:
                merged.append([j, s, v, c])
        self.bins = merged

    def clear(self, width: int = 1) -> None:
        self.bins = []
        self.origin = None
        self.width = max(1, width)

    def state_dict(self) -> dict[str, Any]:
        return {
            "max_bins": self.max_bins,
            "width": self.width,
            "origin": self.origin,
            "bins": [list(b) for b in self.bins],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_bins = int(state["max_bins"])
        self.width = int(state["width"])
        self.origin = None if state["origin"] is None else int(state["origin"])
        self.bins = [[int(b[0]), float(b[1]), float(b[2]), int(b[3])] for b in state["bins"]]


# Baselines over long windows are refreshed on a schedule instead of after every value: the
# threshold in force between refreshes is a constant, so the streaming path does a comparison
# per value and the offline path can compute every refresh at once with the same picks.
def level_due(m: int) -> bool:
    """Whether the short-window level is recomputed after the ``m``-th value (1-based)."""
    return m <= 32 or m % 4 == 0


def scale_due(m: int) -> bool:
    """Whether the long-window spread is recomputed after the ``m``-th value (a subset of level_due)."""
    return m <= 32 or (m <= 128 and m % 4 == 0) or m % 16 == 0


def median_sorted(s: list[float]) -> float:
    """Median of a sorted, non-empty list (the same picks as ``median_rows``)."""
    n = len(s)
    mid = n // 2
    return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])


def iqr_sigma_sorted(s: list[float]) -> float:
    """Robust sigma (IQR / 1.349) of a sorted list with at least 2 values (same picks as ``iqr_sigma_rows``)."""
    n = len(s) - 1
    return (s[int(0.75 * n + 0.5)] - s[int(0.25 * n + 0.5)]) * _IQR_TO_SIGMA


def median_rows(rows: Any) -> Any:
    """Row-wise median of a 2-D numpy array of equal-length rows, exactly as ``median_sorted``."""
    import numpy as np

    return median_sorted_rows(np.sort(rows, axis=1))


def median_sorted_rows(s: Any) -> Any:
    """Row-wise median of row-sorted values, exactly as ``median_sorted``."""
    n = s.shape[1]
    mid = n // 2
    return s[:, mid] if n % 2 else 0.5 * (s[:, mid - 1] + s[:, mid])


def iqr_sigma_rows(sorted_rows: Any) -> Any:
    """Row-wise robust sigma of row-sorted values, exactly as ``iqr_sigma_sorted``."""
    n = sorted_rows.shape[1] - 1
    return (sorted_rows[:, int(0.75 * n + 0.5)] - sorted_rows[:, int(0.25 * n + 0.5)]) * _IQR_TO_SIGMA


def streak_counts(inc: Any, reset: Any, count0: int) -> Any:
    """Length of the current streak after each position: +1 where ``inc``, 0 where ``reset``,
    unchanged elsewhere, starting from ``count0`` (the vectorised form of a streak counter)."""
    import numpy as np

    n = len(inc)
    c = np.cumsum(inc.astype(np.int64))
    base_pos = np.where(reset, np.arange(n), -1)
    np.maximum.accumulate(base_pos, out=base_pos)
    at_reset = np.where(base_pos >= 0, c[np.maximum(base_pos, 0)], -count0)
    return c - at_reset

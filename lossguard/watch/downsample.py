"""Thinning a long curve for display while keeping every spike visible.

A million-step run cannot be drawn point by point in a terminal or a browser, but averaging
buckets would hide exactly the spikes the person training needs to see. Each bucket keeps its
minimum and its maximum (with the steps where they happened), so a one-step spike survives any
amount of thinning. Display only: detection always sees every sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class _Bucket:
    n: int
    x_lo: float
    x_hi: float
    y_min: float
    x_min: float
    y_max: float
    x_max: float
    y_last: float

    def add(self, x: float, y: float) -> None:
        self.n += 1
        self.x_hi = x
        self.y_last = y
        if y < self.y_min:
            self.y_min, self.x_min = y, x
        if y > self.y_max:
            self.y_max, self.x_max = y, x

    def merge(self, other: _Bucket) -> None:
        self.n += other.n
        self.x_hi = other.x_hi
        self.y_last = other.y_last
        if other.y_min < self.y_min:
            self.y_min, self.x_min = other.y_min, other.x_min
        if other.y_max > self.y_max:
            self.y_max, self.x_max = other.y_max, other.x_max


class MinMaxBuckets:
    """A streaming min/max downsampler with bounded memory.

    Values arrive in x order. Buckets hold ``width`` consecutive points; when there are more than
    ``capacity`` buckets, neighbours merge in pairs and ``width`` doubles, so memory stays
    O(capacity) however long the run and each ``add`` is amortised O(1). Non-finite values are
    not plotted as numbers: their x positions are kept apart (the first ``max_marks``) so the
    display can mark them.
    """

    def __init__(self, capacity: int = 2000, *, max_marks: int = 1000) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2, got {capacity}")
        self.capacity = capacity
        self.width = 1
        self.count = 0
        self.buckets: list[_Bucket] = []
        self.nonfinite: list[float] = []
        self.nonfinite_count = 0
        self._max_marks = max_marks

    def add(self, x: float, y: float | None) -> None:
        """Add the point (x, y); None is ignored, NaN and infinities are marked, not drawn."""
        if y is None:
            return
        if not math.isfinite(y):
            self.nonfinite_count += 1
            if len(self.nonfinite) < self._max_marks:
                self.nonfinite.append(x)
            return
        self.count += 1
        last = self.buckets[-1] if self.buckets else None
        if last is not None and last.n < self.width:
            last.add(x, y)
            return
        self.buckets.append(_Bucket(1, x, x, y, x, y, x, y))
        if len(self.buckets) > self.capacity:
            self._halve()

    def _halve(self) -> None:
        merged: list[_Bucket] = []
        for i in range(0, len(self.buckets) - 1, 2):
            a = self.buckets[i]
            a.merge(self.buckets[i + 1])
            merged.append(a)
        if len(self.buckets) % 2:
            merged.append(self.buckets[-1])
        self.buckets = merged
        self.width *= 2

    @property
    def last(self) -> tuple[float, float] | None:
        """The most recent finite point, or None."""
        if not self.buckets:
            return None
        b = self.buckets[-1]
        return b.x_hi, b.y_last

    def points(self) -> tuple[list[float], list[float]]:
        """The thinned curve: per bucket its min and max, in x order (one point when they coincide)."""
        xs: list[float] = []
        ys: list[float] = []
        for b in self.buckets:
            first, second = ((b.x_min, b.y_min), (b.x_max, b.y_max))
            if second[0] < first[0]:
                first, second = second, first
            xs.append(first[0])
            ys.append(first[1])
            if second[0] != first[0]:
                xs.append(second[0])
                ys.append(second[1])
        return xs, ys

    def columns(self, n: int, x_lo: float, x_hi: float) -> list[tuple[float, float] | None]:
        """Min and max of the curve in each of ``n`` equal x-columns over [x_lo, x_hi] (None: empty)."""
        out: list[list[float] | None] = [None] * n
        span = (x_hi - x_lo) or 1.0
        xs, ys = self.points()
        for x, y in zip(xs, ys, strict=True):
            i = min(n - 1, max(0, int((x - x_lo) / span * n)))
            cell = out[i]
            if cell is None:
                out[i] = [y, y]
            else:
                cell[0] = min(cell[0], y)
                cell[1] = max(cell[1], y)
        return [None if c is None else (c[0], c[1]) for c in out]

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "width": self.width,
            "count": self.count,
            "buckets": [[b.n, b.x_lo, b.x_hi, b.y_min, b.x_min, b.y_max, b.x_max, b.y_last] for b in self.buckets],
            "nonfinite": list(self.nonfinite),
            "nonfinite_count": self.nonfinite_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.width = int(state["width"])
        self.count = int(state["count"])
        self.buckets = [_Bucket(int(b[0]), *map(float, b[1:])) for b in state["buckets"]]
        self.nonfinite = [float(x) for x in state["nonfinite"]]
        self.nonfinite_count = int(state["nonfinite_count"])


def minmax_downsample(xs: list[float], ys: list[float], max_points: int) -> tuple[list[float], list[float]]:
    """``xs, ys`` thinned to at most about ``max_points`` points, keeping each bucket's min and max."""
    if len(xs) <= max_points:
        return list(xs), list(ys)
    buckets = MinMaxBuckets(capacity=max(2, max_points // 2))
    for x, y in zip(xs, ys, strict=True):
        buckets.add(x, y)
    return buckets.points()

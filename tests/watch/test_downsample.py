"""Min/max thinning: bounded memory, extremes kept exactly, state round-trips."""

from __future__ import annotations

import math
import random

import pytest

from lossguard.watch.downsample import MinMaxBuckets, minmax_downsample


def test_extremes_survive_any_thinning() -> None:
    rng = random.Random(1)
    b = MinMaxBuckets(capacity=100)
    ys = [rng.gauss(0, 1) for _ in range(100_000)]
    ys[31_337] = 40.0
    ys[77_001] = -40.0
    for i, y in enumerate(ys):
        b.add(i, y)
    assert len(b.buckets) <= 100 and b.width == 1024 and b.count == 100_000
    xs, out = b.points()
    assert len(xs) <= 200 and xs == sorted(xs)
    assert (xs[out.index(40.0)], xs[out.index(-40.0)]) == (31_337, 77_001)
    # every bucket's extremes are the true extremes of its span
    for bk in b.buckets:
        span = ys[int(bk.x_lo): int(bk.x_hi) + 1]
        assert (bk.y_min, bk.y_max) == (min(span), max(span))


def test_nonfinite_values_are_marked_not_drawn() -> None:
    b = MinMaxBuckets(capacity=10, max_marks=2)
    for i, y in enumerate([1.0, math.nan, math.inf, -math.inf, 2.0, None]):
        b.add(i, y)
    assert b.points() == ([0, 4], [1.0, 2.0])
    assert b.nonfinite == [1, 2] and b.nonfinite_count == 3
    assert b.last == (4, 2.0)


def test_state_round_trip() -> None:
    a = MinMaxBuckets(capacity=8)
    for i in range(100):
        a.add(i, math.sin(i))
    b = MinMaxBuckets(capacity=2)
    b.load_state_dict(a.state_dict())
    assert b.points() == a.points() and b.state_dict() == a.state_dict()
    for i in range(100, 120):
        a.add(i, float(i))
        b.add(i, float(i))
    assert b.points() == a.points()


def test_columns_and_function() -> None:
    b = MinMaxBuckets(capacity=10)
    for i, y in enumerate([1.0, 5.0, 2.0, 3.0]):
        b.add(i, y)
    assert b.columns(2, 0, 3) == [(1.0, 5.0), (2.0, 3.0)]
    xs, ys = minmax_downsample(list(range(1000)), [0.0] * 500 + [9.0] + [0.0] * 499, 100)
    assert len(xs) <= 100 and 9.0 in ys
    with pytest.raises(ValueError, match="capacity must be >= 2"):
        MinMaxBuckets(capacity=1)

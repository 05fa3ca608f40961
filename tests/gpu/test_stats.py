"""Per-GPU statistics of a timeline: percentiles as numpy computes them, the user's two-GPU case."""

from __future__ import annotations

from pathlib import Path

import pytest

from lossguard.gpu.stats import device_stats, percentile
from lossguard.gpu.timeline import Timeline

DATA = Path(__file__).parent.parent / "data" / "gpu"


def test_percentile_matches_numpy_linear() -> None:
    np = pytest.importorskip("numpy")
    xs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for q in (0, 5, 50, 95, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_users_case_stats_show_80_vs_16_to_40() -> None:
    s0, s1 = device_stats(Timeline.load(DATA / "placement_two_gpus.json"))
    assert 75 <= s0.util_p50 <= 85  # type: ignore[operator]
    assert 16 <= s1.util_p5 and s1.util_p95 <= 40  # type: ignore[operator]
    assert s0.memory_used_mib == 31250.0 and s0.memory_total_mib == 49140.0
    assert len(s0.util_series) == 60

"""Replaying a recorded timeline behind the NVML interface."""

from __future__ import annotations

from pathlib import Path

import pytest

from lossguard.gpu.nvml import NvmlUnavailable
from lossguard.gpu.replay import ReplayBackend
from lossguard.gpu.timeline import DeviceInfo, Timeline

DATA = Path(__file__).parent.parent / "data" / "gpu"


def test_replay_plays_in_order_then_loops_or_stops() -> None:
    t = Timeline.load(DATA / "data_starved.json")
    looping = ReplayBackend(t)
    times = [looping.sample().t for _ in range(61)]
    assert times[:3] == [t.samples[0].t, t.samples[1].t, t.samples[2].t]
    assert times[60] == t.samples[0].t
    once = ReplayBackend(t, loop=False)
    for _ in range(60):
        once.sample()
    with pytest.raises(IndexError):
        once.sample()
    clocked = ReplayBackend(t, clock=lambda: 123.0)
    s = clocked.sample()
    assert s.t == 123.0 and s.gpus == t.samples[0].gpus
    assert [d.name for d in looping.devices()] == ["NVIDIA A100-SXM4-80GB"]


def test_replay_of_a_no_driver_recording_is_unavailable() -> None:
    with pytest.raises(NvmlUnavailable) as info:
        ReplayBackend.from_file(DATA / "no_driver.json")
    assert str(info.value) == "no NVIDIA GPU found (NVML: driver library not found)"
    with pytest.raises(NvmlUnavailable, match="no GPU sample"):
        ReplayBackend(Timeline(1.0, [DeviceInfo(0)], []))

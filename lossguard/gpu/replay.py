"""A recorded GPU timeline played back behind the NVML interface (the one fake: the hardware)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from lossguard.gpu.nvml import NvmlUnavailable
from lossguard.gpu.timeline import DeviceInfo, Timeline, TimelineSample


class ReplayBackend:
    """Plays a recorded timeline behind the NVML interface, one sample per call.

    With ``loop`` the recording starts over at its end, so a sampler can run indefinitely;
    without it, sampling past the end raises ``IndexError``. Time stamps come from ``clock``
    when given (a live-looking replay), else from the recording.

    Raises:
        NvmlUnavailable: the timeline recorded that NVML was unavailable, or holds no sample.
    """

    def __init__(self, timeline: Timeline, *, loop: bool = True, clock: Callable[[], float] | None = None):
        if timeline.nvml_error is not None:
            raise NvmlUnavailable(timeline.nvml_error)
        if not timeline.devices or not timeline.samples:
            raise NvmlUnavailable("the recording holds no GPU sample")
        self.timeline = timeline
        self.loop = loop
        self._clock = clock
        self.position = 0

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kw: Any) -> ReplayBackend:
        return cls(Timeline.load(path), **kw)

    def devices(self) -> list[DeviceInfo]:
        return list(self.timeline.devices)

    def sample(self) -> TimelineSample:
        samples = self.timeline.samples
        if self.position >= len(samples):
            if not self.loop:
                raise IndexError("replay timeline exhausted")
            self.position = 0
        s = samples[self.position]
        self.position += 1
        if self._clock is None:
            return s
        return TimelineSample(t=self._clock(), gpus=s.gpus, processes=s.processes)

    def close(self) -> None:
        return None

"""Per-GPU statistics of a timeline: utilization percentiles, means, peaks and the processes seen.

What the ``gpu`` record stores and the report table shows; the diagnoses read them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lossguard.gpu.timeline import Timeline


@dataclass
class DeviceStats:
    """One GPU over a window: what the report table shows and the ``gpu`` record stores."""

    index: int
    uuid: str | None
    name: str | None
    mig: bool | None
    n_samples: int
    util_p5: float | None
    util_p50: float | None
    util_p95: float | None
    util_mean: float | None
    util_mem_mean: float | None
    sm_active_mean: float | None
    memory_used_mib: float | None
    memory_total_mib: float | None
    power_w: float | None
    power_limit_w: float | None
    sm_clock_mhz: float | None
    sm_clock_max_mhz: float | None
    temp_c: float | None
    throttle_reasons: list[str]
    util_series: list[float | None]

    def to_dict(self, *, series: bool = True) -> dict[str, Any]:
        d = dict(self.__dict__)
        if not series:
            d.pop("util_series")
        return d


@dataclass
class ProcessStats:
    """A process's largest allocation on one GPU over a window."""

    pid: int
    gpu_index: int
    used_memory_mib: float | None
    name: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def rounded(x: float | None, nd: int = 1) -> float | None:
    """``x`` rounded to ``nd`` decimals, or None."""
    return None if x is None else round(x, nd)


def device_stats(timeline: Timeline) -> list[DeviceStats]:
    """Per-GPU percentiles and means over the whole timeline, in device order."""
    out = []
    for dev in timeline.devices:
        readings = [g for s in timeline.samples for g in s.gpus if g.index == dev.index]
        series = [g.util_gpu for g in readings]
        util = [u for u in series if u is not None]

        def vals(attr: str, rs: Sequence[Any] = readings) -> list[float]:
            return [v for v in (getattr(g, attr) for g in rs) if v is not None]

        mem = vals("memory_used_mib")
        temps = vals("temp_c")
        reasons = sorted({r for g in readings for r in g.throttle_reasons})
        out.append(
            DeviceStats(
                index=dev.index,
                uuid=dev.uuid,
                name=dev.name,
                mig=dev.mig,
                n_samples=len(readings),
                util_p5=rounded(percentile(util, 5)) if util else None,
                util_p50=rounded(percentile(util, 50)) if util else None,
                util_p95=rounded(percentile(util, 95)) if util else None,
                util_mean=rounded(_mean(util)),
                util_mem_mean=rounded(_mean(vals("util_mem"))),
                sm_active_mean=rounded(_mean(vals("sm_active"))),
                memory_used_mib=max(mem) if mem else None,
                memory_total_mib=dev.memory_total_mib,
                power_w=rounded(_mean(vals("power_w"))),
                power_limit_w=dev.power_limit_w,
                sm_clock_mhz=rounded(_mean(vals("sm_clock_mhz")), 0),
                sm_clock_max_mhz=dev.sm_clock_max_mhz,
                temp_c=max(temps) if temps else None,
                throttle_reasons=reasons,
                util_series=series,
            )
        )
    return out


def process_stats(timeline: Timeline) -> list[ProcessStats]:
    """Each (process, GPU) pair seen, with its largest allocation, by GPU then memory."""
    best: dict[tuple[int, int], ProcessStats] = {}
    for s in timeline.samples:
        for p in s.processes:
            key = (p.pid, p.gpu_index)
            cur = best.get(key)
            if cur is None:
                best[key] = ProcessStats(p.pid, p.gpu_index, p.used_memory_mib, p.name)
            elif p.used_memory_mib is not None and (cur.used_memory_mib or -1) < p.used_memory_mib:
                cur.used_memory_mib = p.used_memory_mib
    return sorted(best.values(), key=lambda p: (p.gpu_index, -(p.used_memory_mib or 0), p.pid))

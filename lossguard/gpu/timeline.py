"""The GPU timeline format: what a GPU sample holds, and the JSON file of ``gpu-report --record``.

A timeline is a list of samples of every GPU (and the processes on them) at one interval; it is
what the live NVML backend produces and what the replay backend plays back. Any measurement may
be ``None``: a field the driver does not offer is recorded as missing, not as zero.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lossguard.errors import LossguardError

TIMELINE_VERSION = 1


class TimelineError(LossguardError):
    """A timeline file could not be read or is not in the timeline format."""


@dataclass(frozen=True)
class DeviceInfo:
    """A GPU's identity and fixed limits (``None`` where NVML does not say)."""

    index: int
    uuid: str | None = None
    name: str | None = None
    memory_total_mib: float | None = None
    power_limit_w: float | None = None
    sm_clock_max_mhz: float | None = None
    mig: bool | None = None


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one instant; any measurement may be ``None`` (unsupported or failed)."""

    index: int
    util_gpu: float | None = None
    util_mem: float | None = None
    memory_used_mib: float | None = None
    power_w: float | None = None
    sm_clock_mhz: float | None = None
    temp_c: float | None = None
    throttle_reasons: tuple[str, ...] = ()
    sm_active: float | None = None


@dataclass(frozen=True)
class ProcessReading:
    """A process holding memory on a GPU."""

    pid: int
    gpu_index: int
    used_memory_mib: float | None = None
    name: str = ""


@dataclass(frozen=True)
class TimelineSample:
    """Every sampled GPU, and the processes on them, at time ``t`` (unix seconds)."""

    t: float
    gpus: tuple[GpuReading, ...]
    processes: tuple[ProcessReading, ...] = ()


@dataclass
class Timeline:
    """A recording of GPU samples, the format of ``gpu-report --record`` and ``--replay``.

    ``nvml_error`` records that NVML could not start on the recording machine (the timeline then
    holds no devices), so "no driver" can be replayed like any other case.
    """

    interval_s: float
    devices: list[DeviceInfo]
    samples: list[TimelineSample] = field(default_factory=list)
    nvml_error: str | None = None
    version: int = TIMELINE_VERSION

    def device(self, index: int) -> DeviceInfo | None:
        for d in self.devices:
            if d.index == index:
                return d
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "interval_s": self.interval_s,
            "devices": [asdict(d) for d in self.devices],
            "samples": [_sample_to_dict(s) for s in self.samples],
        }
        if self.nvml_error is not None:
            out["nvml_error"] = self.nvml_error
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "timeline") -> Timeline:
        """Parse the timeline format; ``TimelineError`` names ``source`` and what is wrong."""
        if not isinstance(data, dict):
            raise TimelineError(f"{source}: expected a JSON object with 'devices' and 'samples'")
        version = data.get("version")
        if version != TIMELINE_VERSION:
            raise TimelineError(f"{source}: unsupported timeline version {version!r} (expected {TIMELINE_VERSION})")
        try:
            interval = float(data.get("interval_s", 1.0))
            if not math.isfinite(interval) or interval <= 0:
                raise ValueError(f"interval_s={data.get('interval_s')!r} must be a positive number")
            for key in ("devices", "samples"):
                if not isinstance(data.get(key), list):
                    raise ValueError(f"'{key}' must be a list")
            devices = [_device_from_dict(d) for d in data["devices"]]
            samples = [_sample_from_dict(s) for s in data["samples"]]
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise TimelineError(f"{source}: not a valid GPU timeline ({_why(err)})") from None
        err = data.get("nvml_error")
        return cls(interval, devices, samples, nvml_error=None if err is None else str(err))

    def save(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        try:
            p.write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n", encoding="utf-8")
        except OSError as err:
            raise TimelineError(f"{p}: cannot write timeline ({err.strerror or err})") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Timeline:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TimelineError(f"{p}: no such file") from None
        except IsADirectoryError:
            raise TimelineError(f"{p}: is a directory, expected a timeline JSON file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise TimelineError(f"{p}: cannot read ({getattr(err, 'strerror', None) or err})") from None
        try:
            data = json.loads(text)
        except ValueError as err:
            raise TimelineError(f"{p}: not JSON ({err})") from None
        return cls.from_dict(data, source=str(p))


def _why(err: BaseException) -> str:
    if isinstance(err, KeyError):
        return f"missing field {err.args[0]!r}"
    return str(err)


def _opt(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number or null, got {value!r}")
    return float(value) if math.isfinite(value) else None


def _device_from_dict(d: dict[str, Any]) -> DeviceInfo:
    mig = d.get("mig")
    return DeviceInfo(
        index=int(d["index"]),
        uuid=None if d.get("uuid") is None else str(d["uuid"]),
        name=None if d.get("name") is None else str(d["name"]),
        memory_total_mib=_opt(d.get("memory_total_mib")),
        power_limit_w=_opt(d.get("power_limit_w")),
        sm_clock_max_mhz=_opt(d.get("sm_clock_max_mhz")),
        mig=None if mig is None else bool(mig),
    )


def _sample_from_dict(s: dict[str, Any]) -> TimelineSample:
    gpus = tuple(
        GpuReading(
            index=int(g["index"]),
            util_gpu=_opt(g.get("util_gpu")),
            util_mem=_opt(g.get("util_mem")),
            memory_used_mib=_opt(g.get("memory_used_mib")),
            power_w=_opt(g.get("power_w")),
            sm_clock_mhz=_opt(g.get("sm_clock_mhz")),
            temp_c=_opt(g.get("temp_c")),
            throttle_reasons=tuple(str(r) for r in (g.get("throttle_reasons") or ())),
            sm_active=_opt(g.get("sm_active")),
        )
        for g in s["gpus"]
    )
    procs = tuple(
        ProcessReading(
            pid=int(p["pid"]),
            gpu_index=int(p["gpu_index"]),
            used_memory_mib=_opt(p.get("used_memory_mib")),
            name=str(p.get("name") or ""),
        )
        for p in (s.get("processes") or ())
    )
    t = _opt(s["t"])
    if t is None:
        raise ValueError("sample time 't' must be a number")
    return TimelineSample(t=t, gpus=gpus, processes=procs)


def _sample_to_dict(s: TimelineSample) -> dict[str, Any]:
    gpus = []
    for g in s.gpus:
        d = asdict(g)
        d["throttle_reasons"] = list(g.throttle_reasons)
        if g.sm_active is None:
            d.pop("sm_active")
        gpus.append(d)
    return {"t": s.t, "gpus": gpus, "processes": [asdict(p) for p in s.processes]}

"""What the GPUs are doing, read live from the NVIDIA driver through NVML.

Two backends sit behind one ``NvmlBackend`` protocol: ``RealNvmlBackend`` here reads the driver
via ``nvidia-ml-py`` (module ``pynvml``, imported lazily), ``replay.ReplayBackend`` plays a saved
timeline so a diagnosis can be reproduced anywhere. Every NVML call goes through ``nvml_get``, the
one chokepoint that turns an NVML failure (unsupported field, MIG, permissions) into ``None``: a
missing measurement never stops sampling, it shows as N/A.

NVML "utilization" is the share of time in the sample period during which at least one kernel
ran on the GPU, not how much of the GPU the kernels used: a tiny kernel running all the time
reads 100%.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from lossguard.errors import LossguardError
from lossguard.gpu.timeline import DeviceInfo, GpuReading, ProcessReading, TimelineSample

MIB = 1024 * 1024
T = TypeVar("T")

# NVML clock-event ("throttle") reason bits, named as a person reads them.
THROTTLE_BITS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}


class NvmlUnavailable(LossguardError):
    """No usable NVIDIA GPU: no driver, no device, or NVML refused to start.

    ``str(err)`` is the one line to print; ``reason`` is NVML's part of it.
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(unavailable_message(reason))


class NvmlBackend(Protocol):
    """Where GPU samples come from: the driver, or a recording."""

    def devices(self) -> list[DeviceInfo]:
        """The sampled GPUs, in NVML index order."""
        ...

    def sample(self) -> TimelineSample:
        """One reading of every sampled GPU and the processes on them."""
        ...

    def close(self) -> None:
        """Release the driver (idempotent)."""
        ...


def nvml_get(fn: Callable[..., T], *args: Any) -> T | None:
    """Call an NVML function; an NVML failure (unsupported, MIG, no permission, lost GPU) is None.

    This is the only place lossguard calls NVML after start-up, so a field the driver does not
    offer turns into "N/A" instead of an exception in the sampler thread.
    """
    try:
        return fn(*args)
    except Exception as err:
        if _is_nvml_failure(err):
            return None
        raise


def _is_nvml_failure(err: Exception) -> bool:
    # AttributeError: an older nvidia-ml-py without that function
    if isinstance(err, AttributeError):
        return True
    module = type(err).__module__ or ""
    return module == "pynvml" or module.startswith("pynvml.")


_INIT_REASONS = {
    "NVMLError_LibraryNotFound": "driver library not found",
    "NVMLError_DriverNotLoaded": "driver not loaded",
    "NVMLError_NoPermission": "insufficient permissions",
    "NVMLError_LibRmVersionMismatch": "driver/library version mismatch",
    "NVMLError_GpuIsLost": "GPU is lost",
}


def unavailable_message(reason: str) -> str:
    """The one line printed when there is no usable GPU."""
    return f"no NVIDIA GPU found (NVML: {reason})"


def normalize_uuid(uuid: Any) -> str:
    """A GPU UUID in NVML's spelling (``GPU-`` prefix, lower case), from NVML or torch."""
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    text = text.strip().lower()
    if not text.startswith(("gpu-", "mig-")):
        text = "gpu-" + text
    return "GPU-" + text[4:] if text.startswith("gpu-") else "MIG-" + text[4:]


def visible_nvml_indices(
    visible: str | None,
    uuids: Sequence[str | None],
    mig_parent: Callable[[str], int | None] | None = None,
) -> list[int]:
    """NVML indices of the GPUs that ``CUDA_VISIBLE_DEVICES`` exposes, in CUDA order.

    Entries may be indices or (prefixes of) UUIDs (``GPU-...``; ``MIG-...`` through
    ``mig_parent``). As CUDA does, enumeration stops at the first entry that names no device or
    repeats one. Indices are taken in NVML (PCI bus) order, which matches CUDA only with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; UUIDs are exact, so prefer them.
    """
    n = len(uuids)
    if visible is None:
        return list(range(n))
    known = [normalize_uuid(u) if u else "" for u in uuids]
    out: list[int] = []
    for raw in visible.split(","):
        token = raw.strip()
        if not token:
            break
        idx: int | None = None
        if token.lstrip("-").isdigit():
            value = int(token)
            idx = value if 0 <= value < n else None
        elif token.lower().startswith("mig-"):
            idx = mig_parent(token) if mig_parent is not None else None
        else:
            want = normalize_uuid(token)
            matches = [i for i, u in enumerate(known) if u and u.startswith(want)]
            idx = matches[0] if len(matches) == 1 else None
        if idx is None or idx in out:
            break
        out.append(idx)
    return out


def nvml_index_for_uuid(uuid: Any, devices: Sequence[DeviceInfo]) -> int | None:
    """The NVML index of the device with this UUID (as torch or NVML spells it), or None."""
    want = normalize_uuid(uuid)
    for d in devices:
        if d.uuid and normalize_uuid(d.uuid) == want:
            return d.index
    return None


def throttle_names(mask: int | None) -> tuple[str, ...]:
    """NVML's clock-event bitmask as names (``gpu_idle`` included; the diagnosis ignores it)."""
    if not mask:
        return ()
    return tuple(name for bit, name in THROTTLE_BITS.items() if mask & bit)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class RealNvmlBackend:
    """Reads the NVIDIA driver through NVML.

    Args:
        select: which GPUs, in ``CUDA_VISIBLE_DEVICES`` syntax (indices or UUIDs); None: all.
        gpm: read GPM "SM activity" (share of SMs busy, Hopper and newer) where supported.
        clock: the time stamp of each sample.

    Raises:
        NvmlUnavailable: nvidia-ml-py missing, no driver, NVML failed to start, or no GPU.
    """

    def __init__(self, select: str | None = None, *, gpm: bool = True, clock: Callable[[], float] = time.time):
        try:
            import pynvml
        except ImportError:
            raise NvmlUnavailable("nvidia-ml-py is not installed") from None
        self._nv = pynvml
        self._clock = clock
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            reason = _INIT_REASONS.get(type(err).__name__, str(err))
            raise NvmlUnavailable(reason) from None
        self._open = True
        try:
            self._setup(select, gpm)
        except BaseException:
            self.close()
            raise

    def _setup(self, select: str | None, gpm: bool) -> None:
        nv = self._nv
        count = nvml_get(nv.nvmlDeviceGetCount) or 0
        if count == 0:
            raise NvmlUnavailable("the driver reports 0 devices")
        all_handles = [nvml_get(nv.nvmlDeviceGetHandleByIndex, i) for i in range(count)]
        all_uuids = [_text(nvml_get(nv.nvmlDeviceGetUUID, h)) if h is not None else None for h in all_handles]
        chosen = visible_nvml_indices(select, all_uuids, self._mig_parent)
        self._handles: list[tuple[int, Any]] = [(i, all_handles[i]) for i in chosen if all_handles[i] is not None]
        if not self._handles:
            raise NvmlUnavailable(f"no device matches {select!r}")
        self._events_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        self._names: dict[int, str] = {}
        self._devices = [self._describe(i, h) for i, h in self._handles]
        self._gpm: dict[int, list[Any]] = {}
        if gpm and hasattr(nv, "nvmlGpmQueryDeviceSupport"):
            for i, h in self._handles:
                support = nvml_get(nv.nvmlGpmQueryDeviceSupport, h)
                if support is not None and getattr(support, "isSupportedDevice", 0):
                    a, b = nvml_get(nv.nvmlGpmSampleAlloc), nvml_get(nv.nvmlGpmSampleAlloc)
                    if a is not None and b is not None:
                        self._gpm[i] = [a, b, False]
        self.driver_version = _text(nvml_get(nv.nvmlSystemGetDriverVersion))

    def _mig_parent(self, uuid: str) -> int | None:
        nv = self._nv
        h = nvml_get(nv.nvmlDeviceGetHandleByUUID, uuid)
        parent = nvml_get(nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle, h) if h is not None else None
        return nvml_get(nv.nvmlDeviceGetIndex, parent) if parent is not None else None

    def _describe(self, index: int, h: Any) -> DeviceInfo:
        nv = self._nv
        mem = nvml_get(nv.nvmlDeviceGetMemoryInfo, h)
        limit_mw = nvml_get(nv.nvmlDeviceGetEnforcedPowerLimit, h)
        if limit_mw is None:
            limit_mw = nvml_get(nv.nvmlDeviceGetPowerManagementLimit, h)
        max_sm = nvml_get(nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_SM)
        mig_mode = nvml_get(nv.nvmlDeviceGetMigMode, h)
        return DeviceInfo(
            index=index,
            uuid=_text(nvml_get(nv.nvmlDeviceGetUUID, h)),
            name=_text(nvml_get(nv.nvmlDeviceGetName, h)),
            memory_total_mib=None if mem is None else round(mem.total / MIB, 1),
            power_limit_w=None if limit_mw is None else limit_mw / 1000.0,
            sm_clock_max_mhz=None if max_sm is None else float(max_sm),
            mig=None if mig_mode is None else bool(mig_mode[0] == nv.NVML_DEVICE_MIG_ENABLE),
        )

    def devices(self) -> list[DeviceInfo]:
        return list(self._devices)

    def _process_name(self, pid: int) -> str:
        name = self._names.get(pid)
        if name is None:
            name = _text(nvml_get(self._nv.nvmlSystemGetProcessName, pid)) or ""
            if not name:
                try:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    name = ""
            if len(self._names) > 4096:
                self._names.clear()
            self._names[pid] = name
        return name

    def _sm_active(self, index: int, h: Any) -> float | None:
        slot = self._gpm.get(index)
        if slot is None:
            return None
        nv = self._nv
        prev, cur, primed = slot
        if nvml_get(nv.nvmlGpmSampleGet, h, cur) is None:
            return None
        value = None
        if primed:
            req = nv.c_nvmlGpmMetricsGet_t()
            req.version = nv.NVML_GPM_METRICS_GET_VERSION
            req.numMetrics = 1
            req.sample1 = prev
            req.sample2 = cur
            req.metrics[0].metricId = nv.NVML_GPM_METRIC_SM_UTIL
            got = nvml_get(nv.nvmlGpmMetricsGet, req)
            if got is not None and got.metrics[0].nvmlReturn == 0:
                value = round(float(got.metrics[0].value), 1)
        slot[0], slot[1], slot[2] = cur, prev, True
        return value

    def sample(self) -> TimelineSample:
        nv = self._nv
        t = self._clock()
        gpus = []
        procs: list[ProcessReading] = []
        for index, h in self._handles:
            util = nvml_get(nv.nvmlDeviceGetUtilizationRates, h)
            mem = nvml_get(nv.nvmlDeviceGetMemoryInfo, h)
            power_mw = nvml_get(nv.nvmlDeviceGetPowerUsage, h)
            sm = nvml_get(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)
            temp = nvml_get(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            mask = nvml_get(self._events_fn, h) if self._events_fn is not None else None
            gpus.append(
                GpuReading(
                    index=index,
                    util_gpu=None if util is None else float(util.gpu),
                    util_mem=None if util is None else float(util.memory),
                    memory_used_mib=None if mem is None else round(mem.used / MIB, 1),
                    power_w=None if power_mw is None else round(power_mw / 1000.0, 1),
                    sm_clock_mhz=None if sm is None else float(sm),
                    temp_c=None if temp is None else float(temp),
                    throttle_reasons=throttle_names(mask),
                    sm_active=self._sm_active(index, h),
                )
            )
            for p in nvml_get(nv.nvmlDeviceGetComputeRunningProcesses, h) or ():
                used = getattr(p, "usedGpuMemory", None)
                procs.append(
                    ProcessReading(
                        pid=int(p.pid),
                        gpu_index=index,
                        used_memory_mib=None if used is None else round(used / MIB, 1),
                        name=self._process_name(int(p.pid)),
                    )
                )
        return TimelineSample(t=t, gpus=tuple(gpus), processes=tuple(procs))

    def close(self) -> None:
        if not getattr(self, "_open", False):
            return
        self._open = False
        for prev, cur, _ in getattr(self, "_gpm", {}).values():
            nvml_get(self._nv.nvmlGpmSampleFree, prev)
            nvml_get(self._nv.nvmlGpmSampleFree, cur)
        nvml_get(self._nv.nvmlShutdown)

    def __enter__(self) -> RealNvmlBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


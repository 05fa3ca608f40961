"""Generate the recorded GPU timelines used by the tests (deterministic; rerun to regenerate).

    python tests/data/gpu/make_timelines.py

Each file is in the ``gpu-report --record`` format and models one situation seen on real
machines: its shape (levels, noise, correlations, process lists) follows what NVML reports in
that situation at 1 Hz.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from lossguard.gpu.timeline import DeviceInfo, GpuReading, ProcessReading, Timeline, TimelineSample

HERE = Path(__file__).parent
T0 = 1_750_000_000.0
N = 60


def _dev(i: int, name: str, mem: float, power: float, clock: float, *, mig: bool = False) -> DeviceInfo:
    return DeviceInfo(
        index=i,
        uuid=f"GPU-{i:08x}-5e1c-4b1a-9c3d-{0x1000 + i:012x}",
        name=name,
        memory_total_mib=mem,
        power_limit_w=power,
        sm_clock_max_mhz=clock,
        mig=mig,
    )


def _clip(x: float) -> float:
    return float(max(0, min(100, round(x))))


def _reading(
    i: int, util: float | None, rng: random.Random, dev: DeviceInfo, mem_used: float | None,
    *, clock: float | None = None, temp: float | None = None, reasons: tuple[str, ...] = (),
) -> GpuReading:
    busy = (util or 0.0) / 100.0
    assert dev.power_limit_w and dev.sm_clock_max_mhz
    return GpuReading(
        index=i,
        util_gpu=None if util is None else _clip(util),
        util_mem=None if util is None else _clip(util * 0.45 + rng.gauss(0, 2)),
        memory_used_mib=mem_used,
        power_w=round(dev.power_limit_w * (0.2 + 0.7 * busy) + rng.gauss(0, 5), 1),
        sm_clock_mhz=clock if clock is not None else dev.sm_clock_max_mhz,
        temp_c=temp if temp is not None else round(40 + 35 * busy + rng.gauss(0, 1)),
        throttle_reasons=reasons,
    )


def _timeline(
    devices: list[DeviceInfo],
    per_sample: Callable[[int, random.Random], tuple[list[GpuReading], list[ProcessReading]]],
    seed: int,
) -> Timeline:
    rng = random.Random(seed)
    samples = []
    for k in range(N):
        gpus, procs = per_sample(k, rng)
        samples.append(TimelineSample(t=T0 + k, gpus=tuple(gpus), processes=tuple(procs)))
    return Timeline(interval_s=1.0, devices=devices, samples=samples)


def placement_two_gpus() -> Timeline:
    """The user's case: device_map="auto" on 2 GPUs, one process, GPU 0 ~80%, GPU 1 16-40%."""
    devs = [_dev(i, "NVIDIA RTX A6000", 49140.0, 300.0, 2100.0) for i in range(2)]

    def at(k: int, rng: random.Random) -> tuple[list[GpuReading], list[ProcessReading]]:
        x = rng.random()  # how much of the second the pipeline spent in GPU 0's layers
        u0 = 72 + 16 * x + rng.gauss(0, 2)
        u1 = 40 - 24 * x + rng.gauss(0, 2)
        gpus = [_reading(0, u0, rng, devs[0], 31250.0), _reading(1, u1, rng, devs[1], 27410.0)]
        procs = [ProcessReading(4242, 0, 30720.0, "python"), ProcessReading(4242, 1, 26880.0, "python")]
        return gpus, procs

    return _timeline(devs, at, seed=1)


def _ddp_devices() -> list[DeviceInfo]:
    return [_dev(i, "NVIDIA H100 80GB HBM3", 81559.0, 700.0, 1980.0) for i in range(4)]


def ddp_balanced() -> Timeline:
    """Four DDP ranks, one process per GPU, all busy 93-99%."""
    devs = _ddp_devices()

    def at(k: int, rng: random.Random) -> tuple[list[GpuReading], list[ProcessReading]]:
        gpus = [_reading(i, 96 + rng.gauss(0, 1.2), rng, devs[i], 61440.0 + 64 * i) for i in range(4)]
        procs = [ProcessReading(5100 + i, i, 60800.0, "python") for i in range(4)]
        return gpus, procs

    return _timeline(devs, at, seed=2)


def ddp_straggler() -> Timeline:
    """Four DDP ranks; rank 2 gets longer sequences and averages ~60% while the others ~93%."""
    devs = _ddp_devices()

    def at(k: int, rng: random.Random) -> tuple[list[GpuReading], list[ProcessReading]]:
        levels = [93, 94, 60, 92]
        gpus = [_reading(i, levels[i] + rng.gauss(0, 3), rng, devs[i], 61440.0) for i in range(4)]
        procs = [ProcessReading(5200 + i, i, 60800.0, "python") for i in range(4)]
        return gpus, procs

    return _timeline(devs, at, seed=3)


def data_starved() -> Timeline:
    """One GPU, 3 s of work then 2 s waiting for the data loader: a square wave."""
    devs = [_dev(0, "NVIDIA A100-SXM4-80GB", 81920.0, 400.0, 1410.0)]

    def at(k: int, rng: random.Random) -> tuple[list[GpuReading], list[ProcessReading]]:
        busy = k % 5 < 3
        util = 97 + rng.gauss(0, 1.5) if busy else rng.uniform(0, 4)
        return [_reading(0, util, rng, devs[0], 52300.0)], [ProcessReading(6100, 0, 51700.0, "python")]

    return _timeline(devs, at, seed=4)


def mig_unsupported() -> Timeline:
    """An A100 in MIG mode: utilization is not supported at device level, processes not visible."""
    devs = [_dev(0, "NVIDIA A100-SXM4-40GB", 40960.0, 400.0, 1410.0, mig=True)]

    def at(k: int, rng: random.Random) -> tuple[list[GpuReading], list[ProcessReading]]:
        r = _reading(0, None, rng, devs[0], 18230.0)
        r = GpuReading(index=0, memory_used_mib=18230.0, power_w=r.power_w, sm_clock_mhz=1410.0, temp_c=51.0)
        return [r], []

    return _timeline(devs, at, seed=5)


def ddp_stray_context() -> Timeline:
    """Two DDP ranks; rank 1 also opened a context on GPU 0 before set_device (a stray 500 MiB)."""
    devs = [_dev(i, "NVIDIA A100-SXM4-80GB", 81920.0, 400.0, 1410.0) for i in range(2)]

    def at(k: int, rng: random.Random) -> tuple[list[GpuReading], list[ProcessReading]]:
        gpus = [_reading(i, 95 + rng.gauss(0, 1.5), rng, devs[i], 41500.0 + 514 * (i == 0)) for i in range(2)]
        procs = [
            ProcessReading(7100, 0, 40960.0, "python"),
            ProcessReading(7101, 0, 514.0, "python"),
            ProcessReading(7101, 1, 40960.0, "python"),
        ]
        return gpus, procs

    return _timeline(devs, at, seed=6)


def thermal_throttle() -> Timeline:
    """One busy GPU whose SM clock drops to ~1100 MHz at 87 C half of the time."""
    devs = [_dev(0, "NVIDIA GeForce RTX 4090", 24564.0, 450.0, 2520.0)]

    def at(k: int, rng: random.Random) -> tuple[list[GpuReading], list[ProcessReading]]:
        hot = k >= N // 2
        r = _reading(
            0, 98 + rng.gauss(0, 1), rng, devs[0], 20100.0,
            clock=1100.0 + rng.uniform(0, 60) if hot else 2505.0,
            temp=87.0 if hot else 78.0,
            reasons=("sw_thermal", "hw_thermal") if hot else (),
        )
        return [r], [ProcessReading(8100, 0, 19800.0, "python")]

    return _timeline(devs, at, seed=7)


def no_driver() -> Timeline:
    """Recorded on a machine without the NVIDIA driver."""
    return Timeline(interval_s=1.0, devices=[], samples=[], nvml_error="driver library not found")


FIXTURES: dict[str, Callable[[], Timeline]] = {
    "placement_two_gpus": placement_two_gpus,
    "ddp_balanced": ddp_balanced,
    "ddp_straggler": ddp_straggler,
    "data_starved": data_starved,
    "mig_unsupported": mig_unsupported,
    "ddp_stray_context": ddp_stray_context,
    "thermal_throttle": thermal_throttle,
    "no_driver": no_driver,
}


def main() -> None:
    for name, make in FIXTURES.items():
        make().save(HERE / f"{name}.json")
        print(f"wrote {name}.json")


if __name__ == "__main__":
    main()

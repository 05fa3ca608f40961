"""GPU check for a machine with an NVIDIA GPU: NVML calls, sample cost, utilization plausibility.

    python benchmarks/gpu_check.py [--steps 300] [--out DIR]

1. every NVML call lossguard uses, on every GPU: value (or N/A) and microseconds per call;
2. one full sample (all fields, all GPUs) timed over 200 repetitions, vs the 0.2 ms replay budget;
3. CUDA device -> NVML index by UUID, and the CUDA_VISIBLE_DEVICES mapping;
4. a matmul burn and an idle pause, sampled at 5 Hz: utilization must read high, then low;
5. the tiny model trained on CUDA: a baseline without sampling, with a 1 Hz and a 100 Hz
   sampler (the sampler's cost to a launch-bound loop), and with LossGuard attached (gpu
   records from the callback when it writes them, else from a GpuSampler run by this script)
   checked for plausible utilization and our PID.
Prints PASS/FAIL per check and exits 1 on any FAIL; without a GPU, prints why and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lossguard.gpu.diagnosis import diagnose
from lossguard.gpu.nvml import NvmlUnavailable, RealNvmlBackend, nvml_get, visible_nvml_indices
from lossguard.gpu.sampler import GpuSampler, timeline_from_records
from lossguard.gpu.stats import device_stats
from lossguard.gpu.timeline import Timeline

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def timed(fn: Any, *args: Any, n: int = 100) -> tuple[Any, float]:
    value = nvml_get(fn, *args)
    t0 = time.perf_counter()
    for _ in range(n):
        nvml_get(fn, *args)
    return value, 1e6 * (time.perf_counter() - t0) / n


def nvml_calls() -> None:
    import pynvml as nv

    nv.nvmlInit()
    try:
        print("== NVML calls (value, us/call)")
        count, us = timed(nv.nvmlDeviceGetCount)
        print(f"nvmlDeviceGetCount: {count} ({us:.1f} us)")
        drv, us = timed(nv.nvmlSystemGetDriverVersion)
        print(f"nvmlSystemGetDriverVersion: {drv} ({us:.1f} us)")
        for i in range(count or 0):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            ev = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or nv.nvmlDeviceGetCurrentClocksThrottleReasons
            calls = [
                ("nvmlDeviceGetUUID", nv.nvmlDeviceGetUUID, (h,)),
                ("nvmlDeviceGetName", nv.nvmlDeviceGetName, (h,)),
                ("nvmlDeviceGetMemoryInfo", nv.nvmlDeviceGetMemoryInfo, (h,)),
                ("nvmlDeviceGetEnforcedPowerLimit", nv.nvmlDeviceGetEnforcedPowerLimit, (h,)),
                ("nvmlDeviceGetPowerManagementLimit", nv.nvmlDeviceGetPowerManagementLimit, (h,)),
                ("nvmlDeviceGetMaxClockInfo(SM)", nv.nvmlDeviceGetMaxClockInfo, (h, nv.NVML_CLOCK_SM)),
                ("nvmlDeviceGetMigMode", nv.nvmlDeviceGetMigMode, (h,)),
                ("nvmlDeviceGetUtilizationRates", nv.nvmlDeviceGetUtilizationRates, (h,)),
                ("nvmlDeviceGetPowerUsage", nv.nvmlDeviceGetPowerUsage, (h,)),
                ("nvmlDeviceGetClockInfo(SM)", nv.nvmlDeviceGetClockInfo, (h, nv.NVML_CLOCK_SM)),
                ("nvmlDeviceGetTemperature", nv.nvmlDeviceGetTemperature, (h, nv.NVML_TEMPERATURE_GPU)),
                (ev.__name__, ev, (h,)),
                ("nvmlDeviceGetComputeRunningProcesses", nv.nvmlDeviceGetComputeRunningProcesses, (h,)),
                ("nvmlGpmQueryDeviceSupport", nv.nvmlGpmQueryDeviceSupport, (h,)),
            ]
            for name, fn, args in calls:
                value, us = timed(fn, *args)
                shown = "N/A (unsupported or failed)" if value is None else _short(value)
                print(f"GPU {i} {name}: {shown} ({us:.1f} us)")
            value, us = timed(nv.nvmlSystemGetProcessName, os.getpid())
            print(f"nvmlSystemGetProcessName(self): {value!r} ({us:.1f} us)")
    finally:
        nv.nvmlShutdown()


def _short(value: Any) -> str:
    for attrs in (("gpu", "memory"), ("used", "total"), ("isSupportedDevice",)):
        if all(hasattr(value, a) for a in attrs):
            return ", ".join(f"{a}={getattr(value, a)}" for a in attrs)
    if isinstance(value, list) and value and hasattr(value[0], "pid"):
        return ", ".join(f"pid {p.pid} {getattr(p, 'usedGpuMemory', None)}" for p in value)
    return repr(value)[:80]


def sample_cost() -> None:
    with RealNvmlBackend() as backend:
        backend.sample()
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            backend.sample()
            times.append(1000 * (time.perf_counter() - t0))
        n = len(backend.devices())
        times.sort()
        print(f"== one sample of {n} GPU(s): mean {statistics.mean(times):.3f} ms, p50 {times[100]:.3f} ms, "
              f"p95 {times[190]:.3f} ms, max {times[-1]:.3f} ms ({statistics.mean(times) / n:.3f} ms per GPU)")
        check("sample cost", statistics.mean(times) / n < 5.0,
              f"{statistics.mean(times) / n:.3f} ms per GPU (runs in the sampler thread; replay budget 0.2 ms)")


def mapping(torch: Any) -> None:
    with RealNvmlBackend() as backend:
        devices = backend.devices()
        uuids = [d.uuid for d in devices]
        from lossguard.gpu.nvml import nvml_index_for_uuid

        for c in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(c)
            uuid = getattr(props, "uuid", None)
            idx = nvml_index_for_uuid(uuid, devices) if uuid is not None else None
            print(f"cuda:{c} {props.name} uuid {uuid} -> NVML index {idx}")
            if c == 0:
                check("cuda->nvml by uuid", idx is not None, f"cuda:0 -> NVML {idx}")
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        print(f"CUDA_VISIBLE_DEVICES={env!r} -> NVML {visible_nvml_indices(env, uuids)}")


def sampled(fn: Any, interval: float, context: dict[str, Any] | None = None) -> tuple[Any, list[dict[str, Any]], GpuSampler]:
    records: list[dict[str, Any]] = []
    sampler = GpuSampler(records.append, interval_s=interval, context=context)
    sampler.start()
    try:
        value = fn()
    finally:
        sampler.stop()
    return value, records, sampler


def burn_and_idle(torch: Any) -> None:
    dev = torch.device("cuda:0")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

    def burn() -> None:
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            for _ in range(10):
                a @ a
            torch.cuda.synchronize()

    _, recs, _ = sampled(burn, 0.2)
    busy = device_stats(timeline_from_records(recs))
    _, recs, _ = sampled(lambda: time.sleep(2.0), 0.2)
    idle = device_stats(timeline_from_records(recs))
    with RealNvmlBackend(os.environ.get("CUDA_VISIBLE_DEVICES")) as b:
        first = b.devices()[0].index
    bu = next(s for s in busy if s.index == first)
    iu = next(s for s in idle if s.index == first)
    print(f"== matmul burn: util p5/p50/p95 {bu.util_p5}/{bu.util_p50}/{bu.util_p95}, SM active {bu.sm_active_mean}, "
          f"power {bu.power_w}/{bu.power_limit_w} W, clock {bu.sm_clock_mhz}/{bu.sm_clock_max_mhz} MHz")
    print(f"== idle: util p5/p50/p95 {iu.util_p5}/{iu.util_p50}/{iu.util_p95}")
    check("burn reads busy", (bu.util_p50 or 0) >= 90, f"util p50 {bu.util_p50}% during matmuls")
    check("idle reads idle", iu.util_p50 is not None and iu.util_p50 <= 10, f"util p50 {iu.util_p50}% while sleeping")


def train_tiny(torch: Any, steps: int, out: Path) -> None:
    from lossguard.testing.tiny import make_trainer, tiny_setup

    try:
        from lossguard import LossGuard
    except Exception as err:  # the callback may not be wired yet
        print(f"LossGuard unavailable ({type(err).__name__}: {err}); training without it")
        LossGuard = None  # noqa: N806

    def run(name: str, callbacks: list[Any], n: int = steps) -> tuple[float, Any]:
        setup = tiny_setup()
        trainer = make_trainer(setup, str(out / name), callbacks=callbacks, use_cpu=False, max_steps=n,
                               logging_steps=max(1, n // 10), learning_rate=1e-2)
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0, trainer

    run("warmup", [], 20)  # CUDA context, kernels and allocator warm before anything is timed
    base_s, _ = run("baseline", [])
    print(f"== tiny model, {steps} steps on CUDA without lossguard: {base_s:.2f} s ({1000 * base_s / steps:.2f} ms/step)")

    guard = [LossGuard()] if LossGuard is not None else []
    (guard_s, trainer), recs, sampler = sampled(lambda: run("lossguard", guard), 1.0)
    events = out / "lossguard" / "lossguard" / "events.jsonl"
    from_callback = []
    if events.is_file():
        from lossguard.telemetry import read_events

        from_callback = [r for r in read_events(events) if r.get("kind") == "gpu"]
    source = "callback" if from_callback else "script sampler"
    records = from_callback or recs
    print(f"== with LossGuard + 1 Hz sampler: {guard_s:.2f} s ({1000 * guard_s / steps:.2f} ms/step), "
          f"{len(records)} gpu record(s) from the {source}, sampler mean {sampler.mean_sample_ms} ms/sample")
    (one_s, _), _, one = sampled(lambda: run("sampler1hz", []), 1.0)
    (fast_s, _), _, fast = sampled(lambda: run("sampler100hz", []), 0.01)
    for label, secs, smp in (("1 Hz", one_s, one), ("100 Hz", fast_s, fast)):
        print(f"== with a {label} sampler only: {secs:.2f} s, {smp.n_samples} samples, "
              f"mean {smp.mean_sample_ms or 0:.3f} ms/sample; time ratio vs baseline {secs / base_s:.3f}")
    check("1 Hz sampler does not slow training", one_s / base_s < 1.10, f"{one_s / base_s:.3f}x baseline")

    t: Timeline = timeline_from_records(records)
    stats = device_stats(t)
    pid = os.getpid()
    procs = {(p.get("pid"), p.get("gpu_index")) for r in records for p in r.get("processes", [])}
    used = [s for s in stats if s.util_mean is not None and (s.util_mean or 0) > 0]
    for s in stats:
        print(f"GPU {s.index} {s.name}: util p5/p50/p95 {s.util_p5}/{s.util_p50}/{s.util_p95}, mean {s.util_mean}, "
              f"SM active {s.sm_active_mean}, memory {s.memory_used_mib}/{s.memory_total_mib} MiB")
    check("training reads some utilization", bool(used) and all(0 <= (s.util_p95 or 0) <= 100 for s in stats),
          f"util means {[s.util_mean for s in stats]}")
    check("our process is listed", any(p == pid for p, _ in procs), f"pid {pid} in {sorted(procs)[:6]}")
    for d in diagnose(t, world_size=1, parallel_mode="single"):
        print(f"diagnosis: {d.kind.value}: {d.message}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    try:
        RealNvmlBackend().close()
    except NvmlUnavailable as err:
        print(f"{err}; SKIPPED: this check needs an NVIDIA GPU")
        return 0
    sections: list[tuple[str, Any]] = [("nvml calls", lambda: nvml_calls()), ("sample cost", lambda: sample_cost())]
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        torch, has_cuda = None, False
    out = Path(opts.out or tempfile.mkdtemp(prefix="lossguard-gpu-check-"))
    if has_cuda:
        sections += [
            ("cuda mapping", lambda: mapping(torch)),
            ("burn and idle", lambda: burn_and_idle(torch)),
            ("tiny training", lambda: train_tiny(torch, opts.steps, out)),
        ]
    else:
        print("torch sees no CUDA device: skipping the mapping, burn and training checks")
    for name, fn in sections:
        try:
            fn()
        except Exception as err:
            check(name, False, f"raised {type(err).__name__}: {err}")
    failed = [n for n, ok, _ in RESULTS if not ok]
    print(f"== {len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Why the GPUs are idle: diagnoses with advice, from the per-GPU statistics of a timeline.

Pure functions over a ``Timeline`` (no NVML, no torch), shared by the sampler inside training,
``gpu-report`` live and ``gpu-report --replay``/``--run``, so they all say the same thing.

Every message reminds the reader what NVML utilization measures: the share of time a kernel was
running, not how much work the GPU did. A GPU at 100% can still be running tiny kernels; a GPU
at 30% is certainly waiting 70% of the time.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lossguard.gpu.stats import DeviceStats, ProcessStats, device_stats, process_stats, rounded
from lossguard.gpu.timeline import DeviceInfo, Timeline
from lossguard.records import Severity

UTIL_MEANS = "NVML utilization is the share of time a kernel was running, not work done"

MIN_SAMPLES = 5
IMBALANCE_POINTS = 10.0
LOW_P95 = 70.0
SQUARE_P5 = 10.0
ACTIVE_UTIL = 5.0
BIG_ALLOCATION_MIB = 1024.0
SMALL_BATCH_MEMORY_SHARE = 0.5
THROTTLE_CLOCK_SHARE = 0.9
THROTTLE_MIN_SHARE = 0.2
THROTTLE_REASONS = frozenset({"sw_power_cap", "hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake"})
PARALLEL_MODES = ("single", "ddp", "fsdp", "deepspeed", "model_parallel")


class DiagnosisKind(str, enum.Enum):
    """What is keeping the GPUs idle."""

    PLACEMENT_MODEL_PARALLEL = "placement_model_parallel"
    RANK_IMBALANCE = "rank_imbalance"
    INPUT_BOUND = "input_bound"
    SMALL_BATCH = "small_batch"
    STRAY_CONTEXT = "stray_context"
    THROTTLING = "throttling"


@dataclass
class Diagnosis:
    """One explanation of idle GPU time, with the numbers behind it and what to do."""

    kind: DiagnosisKind
    severity: Severity
    message: str
    advice: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "severity": self.severity.value,
            "message": self.message,
            "advice": self.advice,
            "evidence": dict(self.evidence),
        }


@dataclass(frozen=True)
class GpuContext:
    """What the training side knows about how the GPUs are used (all optional).

    ``parallel_mode`` is one of ``single``, ``ddp``, ``fsdp``, ``deepspeed``, ``model_parallel``
    (layers placed across GPUs by ``device_map``). ``hf_device_map`` is ``model.hf_device_map``.
    """

    world_size: int | None = None
    parallel_mode: str | None = None
    hf_device_map: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> GpuContext:
        if not d:
            return cls()
        ws = d.get("world_size")
        hdm = d.get("hf_device_map")
        return cls(
            world_size=int(ws) if isinstance(ws, (int, float)) and not isinstance(ws, bool) else None,
            parallel_mode=None if d.get("parallel_mode") is None else str(d.get("parallel_mode")),
            hf_device_map=dict(hdm) if isinstance(hdm, Mapping) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.world_size is not None:
            out["world_size"] = self.world_size
        if self.parallel_mode is not None:
            out["parallel_mode"] = self.parallel_mode
        if self.hf_device_map is not None:
            out["hf_device_map"] = {str(k): _device_label(v) for k, v in self.hf_device_map.items()}
        return out

    def mapped_gpus(self) -> list[int]:
        """GPU indices that ``hf_device_map`` places modules on (``cuda:1``, ``1``)."""
        found: set[int] = set()
        for v in (self.hf_device_map or {}).values():
            idx = _gpu_of(v)
            if idx is not None:
                found.add(idx)
        return sorted(found)

    def describe(self) -> str:
        parts = []
        if self.parallel_mode:
            parts.append(f"parallel mode {self.parallel_mode}")
        if self.world_size is not None:
            parts.append(f"world size {self.world_size}")
        return ", ".join(parts)


def _device_label(v: Any) -> Any:
    return v if isinstance(v, (int, str)) else str(v)


def _gpu_of(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    text = str(v)
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    if text.isdigit():
        return int(text)
    return None


def _correlation(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    pairs = [(x, y) for x, y in zip(a, b, strict=False) if x is not None and y is not None]
    if len(pairs) < MIN_SAMPLES:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def _is_active(st: DeviceStats, procs: Sequence[ProcessStats]) -> bool:
    if any(p.gpu_index == st.index for p in procs):
        return True
    if st.util_mean is not None and st.util_mean >= ACTIVE_UTIL:
        return True
    if st.memory_used_mib is not None and st.memory_total_mib:
        return st.memory_used_mib > 0.05 * st.memory_total_mib
    return False


def _pct(x: float | None) -> str:
    return "N/A" if x is None else f"{x:.0f}%"


def _with_context(message: str, ctx: GpuContext) -> str:
    extra = ctx.describe()
    return f"{message} ({extra}; {UTIL_MEANS})" if extra else f"{message} ({UTIL_MEANS})"


def diagnose(
    timeline: Timeline,
    *,
    world_size: int | None = None,
    parallel_mode: str | None = None,
    hf_device_map: Mapping[str, Any] | None = None,
) -> list[Diagnosis]:
    """Diagnoses of a timeline, most severe first; [] when the GPUs look well used.

    Utilization-based diagnoses need at least ``MIN_SAMPLES`` readings; GPUs that report no
    utilization (MIG, unsupported) are skipped, not guessed at. ``world_size``,
    ``parallel_mode`` and ``hf_device_map`` come from the trainer when known and sharpen the
    diagnosis (a device map spanning GPUs is direct evidence of placement).
    """
    ctx = GpuContext(world_size, parallel_mode, hf_device_map)
    stats = device_stats(timeline)
    procs = process_stats(timeline)
    active = [st for st in stats if _is_active(st, procs)]
    out: list[Diagnosis] = []
    placement = _placement(stats, active, procs, ctx)
    explained: set[int] = set()
    if placement is not None:
        out.append(placement)
        explained.update(placement.evidence["gpus"])
    imbalance = _imbalance([st for st in active if st.index not in explained], ctx)
    if imbalance is not None:
        out.append(imbalance)
        explained.add(imbalance.evidence["lowest_gpu"])
    for st in active:
        if st.index in explained:
            continue
        out.extend(_input_or_batch(st, ctx))
    stray = _stray(stats, procs, ctx)
    if stray is not None:
        out.append(stray)
    for st in active:
        t = _throttling(st, timeline, ctx)
        if t is not None:
            out.append(t)
    out.sort(key=lambda d: -d.severity.rank)
    return out


def _placement(
    stats: list[DeviceStats], active: list[DeviceStats], procs: list[ProcessStats], ctx: GpuContext
) -> Diagnosis | None:
    by_index = {st.index: st for st in stats}
    spanning: dict[int, list[int]] = {}
    for p in procs:
        if p.used_memory_mib is not None and p.used_memory_mib >= BIG_ALLOCATION_MIB:
            spanning.setdefault(p.pid, []).append(p.gpu_index)
    multi = {pid: sorted(set(g)) for pid, g in spanning.items() if len(set(g)) >= 2}
    mapped = [g for g in ctx.mapped_gpus() if g in by_index] or ctx.mapped_gpus()
    gpus: list[int] = []
    evidence: dict[str, Any] = {}
    if multi:
        pid, gpus = max(multi.items(), key=lambda kv: len(kv[1]))
        evidence["pid"] = pid
        evidence["pid_gpus"] = gpus
    if len(mapped) >= 2:
        evidence["hf_device_map_gpus"] = mapped
        gpus = sorted(set(gpus) | {g for g in mapped if g in by_index})
    strong = bool(evidence)
    if not strong:
        gpus = _anticorrelated_pair(active)
        if not gpus:
            return None
    util = [by_index[g] for g in gpus if g in by_index and by_index[g].util_mean is not None]
    if len(util) >= 2:
        corr = _correlation(util[0].util_series, util[1].util_series)
        evidence["correlation"] = rounded(corr, 2)
        evidence["util_mean"] = {str(st.index): st.util_mean for st in util}
        evidence["util_sum"] = rounded(sum(st.util_mean or 0.0 for st in util))
    if not strong and len(util) < 2:
        return None
    evidence["gpus"] = gpus
    means = " and ".join(f"GPU {st.index}{' averaged' if k == 0 else ''} {_pct(st.util_mean)}" for k, st in enumerate(util))
    together = f" ({_pct(evidence['util_sum'])} together, about one GPU's worth of work)" if "util_sum" in evidence else ""
    if "pid" in evidence:
        who = f"one process (PID {evidence['pid']}) holds memory on GPUs {', '.join(map(str, evidence['pid_gpus']))}"
    elif "hf_device_map_gpus" in evidence:
        who = f"hf_device_map places the model on GPUs {', '.join(map(str, evidence['hf_device_map_gpus']))}"
    else:
        who = f"their utilization is anti-correlated (r = {evidence['correlation']:.2f})"
    msg = (
        f"{means or 'the GPUs took turns'}{together} while {who}: the model is split "
        "across GPUs by placement (device_map), so one GPU computes while the others wait"
    )
    if not strong:
        msg = "possibly " + msg
    n = len(gpus)
    advice = (
        f"If the model fits on one GPU, run one process per GPU (data parallel): `torchrun --nproc_per_node={n} "
        'train.py` or `accelerate launch`, loading with `device_map={"": local_rank}` (local_rank from '
        'the LOCAL_RANK environment variable); if it does not fit, use `device_map="balanced"` or '
        "FSDP / DeepSpeed ZeRO-3."
    )
    sev = Severity.WARNING if strong else Severity.INFO
    return Diagnosis(DiagnosisKind.PLACEMENT_MODEL_PARALLEL, sev, _with_context(msg, ctx), advice, evidence)


def _anticorrelated_pair(active: list[DeviceStats]) -> list[int]:
    best: tuple[float, list[int]] | None = None
    for i, a in enumerate(active):
        for b in active[i + 1:]:
            if a.util_mean is None or b.util_mean is None:
                continue
            corr = _correlation(a.util_series, b.util_series)
            spread = abs(a.util_mean - b.util_mean)
            if corr is not None and corr < -0.3 and a.util_mean + b.util_mean <= 130 and spread > IMBALANCE_POINTS:
                if best is None or corr < best[0]:
                    best = (corr, [a.index, b.index])
    return best[1] if best else []


def _imbalance(active: list[DeviceStats], ctx: GpuContext) -> Diagnosis | None:
    measured = [st for st in active if st.util_mean is not None and st.n_samples >= MIN_SAMPLES]
    if len(measured) < 2:
        return None
    lo = min(measured, key=lambda st: st.util_mean or 0.0)
    hi = max(measured, key=lambda st: st.util_mean or 0.0)
    assert lo.util_mean is not None and hi.util_mean is not None
    spread = hi.util_mean - lo.util_mean
    if spread <= IMBALANCE_POINTS:
        return None
    others = [st.util_mean for st in measured if st.index != lo.index and st.util_mean is not None]
    msg = (
        f"GPU {lo.index} averaged {_pct(lo.util_mean)} while the other {len(others)} averaged "
        f"{min(others):.0f}-{max(others):.0f}%, a spread of {spread:.0f} points (over {IMBALANCE_POINTS:.0f})"
    )
    advice = (
        f"Look at GPU {lo.index}: uneven work per rank (sequence lengths; try group_by_length or packing), "
        "a slower data loader on that rank, another process sharing it, or throttled clocks; in DDP every rank waits for the slowest at each "
        "gradient all-reduce, and NCCL waiting counts as busy time."
    )
    evidence = {
        "spread_points": rounded(spread),
        "lowest_gpu": lo.index,
        "util_mean": {str(st.index): st.util_mean for st in measured},
    }
    evidence.update(ctx.to_dict())
    evidence.pop("hf_device_map", None)
    return Diagnosis(DiagnosisKind.RANK_IMBALANCE, Severity.WARNING, _with_context(msg, ctx), advice, evidence)


def _input_or_batch(st: DeviceStats, ctx: GpuContext) -> list[Diagnosis]:
    if st.util_p95 is None or st.util_p5 is None or st.n_samples < MIN_SAMPLES:
        return []
    evidence: dict[str, Any] = {"gpu": st.index, "util_p5": st.util_p5, "util_p50": st.util_p50, "util_p95": st.util_p95}
    if st.util_p95 > LOW_P95 and st.util_p5 < SQUARE_P5:
        msg = (
            f"GPU {st.index} alternates between busy and idle (p95 {_pct(st.util_p95)}, p5 {_pct(st.util_p5)}): "
            "it waits for input between bursts of work"
        )
        advice = (
            "Feed it faster: raise dataloader_num_workers, set dataloader_pin_memory, pre-tokenize the "
            "dataset, and move CPU work (augmentation, logging, evaluation) out of the step."
        )
        return [Diagnosis(DiagnosisKind.INPUT_BOUND, Severity.WARNING, _with_context(msg, ctx), advice, evidence)]
    if st.util_p95 >= LOW_P95:
        return []
    share = None
    if st.memory_used_mib is not None and st.memory_total_mib:
        share = st.memory_used_mib / st.memory_total_mib
        evidence["memory_share"] = round(share, 2)
    if share is not None and share < SMALL_BATCH_MEMORY_SHARE:
        msg = (
            f"GPU {st.index} was busy at most {_pct(st.util_p95)} of the time (p95) with only {share:.0%} of its "
            "memory in use: each step gives it too little work"
        )
        advice = (
            "Raise per_device_train_batch_size (lower gradient_accumulation_steps to keep the effective "
            "batch), or pack short sequences; if the step is CPU-bound, also raise dataloader_num_workers."
        )
        return [Diagnosis(DiagnosisKind.SMALL_BATCH, Severity.WARNING, _with_context(msg, ctx), advice, evidence)]
    msg = (
        f"GPU {st.index} was busy at most {_pct(st.util_p95)} of the time (p95 under {LOW_P95:.0f}%, median "
        f"{_pct(st.util_p50)}): it spends the rest waiting for data, the CPU or small kernels"
    )
    advice = (
        "Raise dataloader_num_workers and enable dataloader_pin_memory, pre-tokenize the data, and use "
        "larger batches if memory allows."
    )
    return [Diagnosis(DiagnosisKind.INPUT_BOUND, Severity.WARNING, _with_context(msg, ctx), advice, evidence)]


def _stray(stats: list[DeviceStats], procs: list[ProcessStats], ctx: GpuContext) -> Diagnosis | None:
    by_pid: dict[int, list[ProcessStats]] = {}
    for p in procs:
        by_pid.setdefault(p.pid, []).append(p)
    strays: list[dict[str, Any]] = []
    for pid, held in by_pid.items():
        if len(held) < 2:
            continue
        home = max(held, key=lambda p: p.used_memory_mib or 0.0)
        for p in held:
            if p is home or p.used_memory_mib is None or home.used_memory_mib is None:
                continue
            if p.used_memory_mib < min(BIG_ALLOCATION_MIB, 0.25 * home.used_memory_mib):
                strays.append({"pid": pid, "gpu": p.gpu_index, "home_gpu": home.gpu_index, "memory_mib": p.used_memory_mib})
    if not strays:
        return None
    gpu = min(strays, key=lambda s: s["gpu"])["gpu"]
    on_gpu = [s for s in strays if s["gpu"] == gpu]
    total = sum(s["memory_mib"] for s in on_gpu)
    dev = next((st for st in stats if st.index == gpu), None)
    big = total >= BIG_ALLOCATION_MIB or (dev is not None and dev.memory_total_mib and total > 0.05 * dev.memory_total_mib)
    homes = ", ".join(str(s["home_gpu"]) for s in on_gpu)
    if len(on_gpu) == 1:
        who = f"PID {on_gpu[0]['pid']}, which trains on GPU {homes}, also holds"
    else:
        who = f"{len(on_gpu)} processes that train on GPUs {homes} also hold"
    msg = (
        f"{who} {total:.0f} MiB on GPU {gpu} (a stray CUDA context each), taking memory and time slices "
        "from the rank that trains there"
    )
    advice = (
        "Call torch.cuda.set_device(local_rank) before any CUDA work in each process (torchrun with the "
        "Trainer or accelerate does this), and avoid torch.cuda calls or `.cuda()` without a device index "
        "before it."
    )
    evidence = {"gpu": gpu, "strays": on_gpu, "memory_mib": round(total, 1)}
    sev = Severity.WARNING if big else Severity.INFO
    return Diagnosis(DiagnosisKind.STRAY_CONTEXT, sev, _with_context(msg, ctx), advice, evidence)


def _throttling(st: DeviceStats, timeline: Timeline, ctx: GpuContext) -> Diagnosis | None:
    dev: DeviceInfo | None = timeline.device(st.index)
    max_clock = dev.sm_clock_max_mhz if dev else None
    readings = [g for s in timeline.samples for g in s.gpus if g.index == st.index]
    if not max_clock or len(readings) < MIN_SAMPLES:
        return None
    hit = [
        g for g in readings
        if g.sm_clock_mhz is not None
        and g.sm_clock_mhz < THROTTLE_CLOCK_SHARE * max_clock
        and THROTTLE_REASONS.intersection(g.throttle_reasons)
    ]
    share = len(hit) / len(readings)
    if share < THROTTLE_MIN_SHARE:
        return None
    reasons = sorted({r for g in hit for r in g.throttle_reasons if r in THROTTLE_REASONS})
    clock = sum(g.sm_clock_mhz or 0.0 for g in hit) / len(hit)
    temps = [g.temp_c for g in hit if g.temp_c is not None]
    powers = [g.power_w for g in hit if g.power_w is not None]
    extra = []
    if temps:
        extra.append(f"up to {max(temps):.0f} C")
    if powers and dev and dev.power_limit_w:
        extra.append(f"{sum(powers) / len(powers):.0f} W of a {dev.power_limit_w:.0f} W limit")
    msg = (
        f"GPU {st.index} ran its SM clock at {clock:.0f} of {max_clock:.0f} MHz in {share:.0%} of samples "
        f"because of {', '.join(reasons)}" + (f" ({', '.join(extra)})" if extra else "")
    )
    thermal = any("thermal" in r or r == "hw_slowdown" for r in reasons)
    advice = (
        "Check cooling and airflow (fans, inlet temperature, neighbouring cards); `nvidia-smi -q -d PERFORMANCE` "
        "shows the active reasons." if thermal else
        "The board is at its power cap: check `nvidia-smi -q -d POWER`; a raised power limit (if the admin "
        "allows) or better cooling restores clocks."
    )
    evidence = {
        "gpu": st.index,
        "share": round(share, 2),
        "sm_clock_mhz": round(clock),
        "sm_clock_max_mhz": max_clock,
        "reasons": reasons,
    }
    return Diagnosis(DiagnosisKind.THROTTLING, Severity.WARNING, _with_context(msg, ctx), advice, evidence)

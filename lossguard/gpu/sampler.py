"""The GPU sampler that runs beside training: a daemon thread reading NVML once a second.

It only reads: samples go into a buffer, and ``flush()`` (at the end of a logging interval, or
by itself when the buffer fills) turns the buffer into one ``gpu`` record per interval: per-GPU
percentiles and means, the processes on the GPUs, and the diagnoses of that interval. Nothing it
does can block or break a training step: NVML start-up happens in the thread, every failure is
logged once and ends sampling, and ``stop()`` waits at most ``join_timeout_s``.

Run one sampler per node, on local rank 0 (``is_local_rank_zero()``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from lossguard.gpu.diagnosis import GpuContext, diagnose
from lossguard.gpu.nvml import NvmlBackend, NvmlUnavailable, RealNvmlBackend
from lossguard.gpu.stats import device_stats, process_stats
from lossguard.gpu.timeline import DeviceInfo, GpuReading, ProcessReading, Timeline, TimelineSample
from lossguard.numbers import as_float

logger = logging.getLogger("lossguard")

BackendSource = NvmlBackend | Callable[[], NvmlBackend] | None
MAX_CONSECUTIVE_FAILURES = 5

_HF_MODES = {
    "not_parallel": "single",
    "not_distributed": "ddp",  # torch.nn.DataParallel: one process, several GPUs, replicated model
    "distributed": "ddp",
}


def is_local_rank_zero(env: Mapping[str, str] | None = None) -> bool:
    """True in the process that should sample this node's GPUs (``LOCAL_RANK`` 0 or unset)."""
    value = (os.environ if env is None else env).get("LOCAL_RANK", "0").strip() or "0"
    return value == "0"


def normalize_parallel_mode(mode: Any, world_size: int | None = None, hf_device_map: Mapping[str, Any] | None = None) -> str:
    """A parallel mode in the diagnosis' words from HF's ``ParallelMode`` or our own spelling."""
    text = str(getattr(mode, "value", mode) or "").lower()
    if text in ("single", "ddp", "fsdp", "deepspeed", "model_parallel"):
        return text
    if len(GpuContext(hf_device_map=hf_device_map).mapped_gpus()) >= 2 and (world_size or 1) == 1:
        return "model_parallel"
    if text in _HF_MODES:
        return _HF_MODES[text]
    return "ddp" if (world_size or 1) > 1 else "single"


def infer_parallel_context(args: Any = None, model: Any = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """How training uses the GPUs, from ``TrainingArguments`` and the (unwrapped) model.

    Returns ``{"world_size", "parallel_mode", "hf_device_map"}`` (the map only when the model
    has one); ``parallel_mode`` is ``deepspeed``, ``fsdp``, ``ddp``, ``model_parallel`` (layers
    placed across GPUs by ``device_map``) or ``single``.
    """
    env = os.environ if env is None else env
    world = getattr(args, "world_size", None)
    if not isinstance(world, int) or world < 1:
        try:
            world = int(env.get("WORLD_SIZE", "1"))
        except ValueError:
            world = 1
    hdm = getattr(model, "hf_device_map", None) if model is not None else None
    hdm = dict(hdm) if isinstance(hdm, Mapping) else None
    if getattr(args, "deepspeed", None) or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        mode = "deepspeed"
    elif getattr(args, "fsdp", None) or env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        mode = "fsdp"
    else:
        mode = normalize_parallel_mode(getattr(args, "parallel_mode", None), world, hdm)
    out: dict[str, Any] = {"world_size": world, "parallel_mode": mode}
    if hdm is not None:
        out["hf_device_map"] = GpuContext(hf_device_map=hdm).to_dict()["hf_device_map"]
    return out


class GpuSampler:
    """Samples GPUs every ``interval_s`` in a daemon thread and emits a ``gpu`` record per flush.

    Args:
        emit: receives each ``gpu`` record (a dict with ``kind="gpu"``); called from the training
            thread on ``flush()`` and from the sampler thread when the buffer fills. Its errors
            are logged, never raised.
        backend: an ``NvmlBackend``, a zero-argument factory for one (opened inside the thread),
            or None for the real NVML restricted to ``CUDA_VISIBLE_DEVICES``.
        interval_s: seconds between samples (1 Hz by default).
        context: ``world_size`` / ``parallel_mode`` / ``hf_device_map`` for the diagnoses.
        max_buffer: samples held before the thread flushes by itself (bounds memory).
        diagnose: add the interval's diagnoses to each record.
        join_timeout_s: the most ``stop()`` waits for the thread.
    """

    def __init__(
        self,
        emit: Callable[[dict[str, Any]], None],
        *,
        backend: BackendSource = None,
        interval_s: float = 1.0,
        context: Mapping[str, Any] | None = None,
        max_buffer: int = 600,
        diagnose: bool = True,
        join_timeout_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        if not interval_s > 0:
            raise ValueError(f"interval_s={interval_s!r} must be > 0")
        if max_buffer < 1:
            raise ValueError(f"max_buffer={max_buffer!r} must be >= 1")
        self._emit = emit
        self._source = backend
        self.interval_s = float(interval_s)
        self.max_buffer = int(max_buffer)
        self.diagnose = diagnose
        self.join_timeout_s = join_timeout_s
        self._clock = clock
        self._context = GpuContext.from_dict(context)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._buffer: list[TimelineSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backend: NvmlBackend | None = None
        self.devices: list[DeviceInfo] = []
        self.unavailable: str | None = None
        self.n_samples = 0
        self.n_records = 0
        self.failures = 0
        self.sample_seconds = 0.0
        self.max_sample_seconds = 0.0
        self._consecutive_failures = 0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start sampling in a daemon thread (returns at once; a second call does nothing)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lossguard-gpu-sampler", daemon=True)
        self._thread.start()

    def stop(self, *, flush: bool = True, step: int | None = None) -> dict[str, Any] | None:
        """Stop the thread (waiting at most ``join_timeout_s``) and flush what is left."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.join_timeout_s)
        self._thread = None
        record = self.flush(step=step) if flush else None
        self._close_backend()
        return record

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def set_context(self, **context: Any) -> None:
        """Update what the diagnoses know (``world_size``, ``parallel_mode``, ``hf_device_map``)."""
        merged = {**self._context.to_dict(), **{k: v for k, v in context.items() if v is not None}}
        with self._lock:
            self._context = GpuContext.from_dict(merged)

    def open(self) -> bool:
        """Open the backend now (the thread does it if not); False when no GPU can be read."""
        if self._backend is not None:
            return True
        if self.unavailable is not None:
            return False
        try:
            src = self._source
            if src is None:
                backend: NvmlBackend = RealNvmlBackend(select=os.environ.get("CUDA_VISIBLE_DEVICES"))
            elif hasattr(src, "sample"):
                backend = src  # type: ignore[assignment]
            else:
                backend = src()  # type: ignore[operator]
            self.devices = backend.devices()
        except NvmlUnavailable as err:
            self.unavailable = str(err)
            logger.info("lossguard: GPU sampling off: %s", err)
            return False
        except Exception as err:
            self.unavailable = f"{type(err).__name__}: {err}"
            logger.warning("lossguard: GPU sampling off: cannot open NVML (%s); training continues", self.unavailable)
            return False
        self._backend = backend
        return True

    def _close_backend(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            try:
                backend.close()
            except Exception as err:
                logger.debug("lossguard: closing the NVML backend failed: %s", err)

    def _run(self) -> None:
        if not self.open():
            return
        while not self._stop.is_set():
            started = time.perf_counter()
            if not self.sample_once():
                if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                    logger.warning("lossguard: GPU sampling stopped after %d failed reads; training continues",
                                   self._consecutive_failures)
                    return
            elif len(self._buffer) >= self.max_buffer:
                self.flush()
            if self._stop.wait(max(0.0, self.interval_s - (time.perf_counter() - started))):
                return

    # --- sampling and aggregation ----------------------------------------------------------

    def sample_once(self) -> bool:
        """Take one sample now (the thread's unit of work); False when the read failed."""
        backend = self._backend
        if backend is None and not self.open():
            return False
        backend = self._backend
        assert backend is not None
        t0 = time.perf_counter()
        try:
            s = backend.sample()
        except Exception as err:
            self.failures += 1
            self._consecutive_failures += 1
            if self.failures == 1:
                logger.warning("lossguard: a GPU read failed (%s: %s)", type(err).__name__, err)
            return False
        with self._lock:
            self._buffer.append(s)
        dt = time.perf_counter() - t0
        self.n_samples += 1
        self._consecutive_failures = 0
        self.sample_seconds += dt
        self.max_sample_seconds = max(self.max_sample_seconds, dt)
        return True

    @property
    def mean_sample_ms(self) -> float | None:
        """Average time one sample took (NVML reads plus buffering), in milliseconds."""
        return 1000.0 * self.sample_seconds / self.n_samples if self.n_samples else None

    def flush(self, step: int | None = None) -> dict[str, Any] | None:
        """Aggregate the samples since the last flush into a ``gpu`` record and emit it.

        Returns the record, or None when there was nothing to aggregate.
        """
        with self._flush_lock:
            with self._lock:
                samples, self._buffer = self._buffer, []
                context = self._context
            if not samples:
                return None
            record = build_record(
                Timeline(self.interval_s, list(self.devices), samples), context, step=step, diagnose_it=self.diagnose
            )
            self.n_records += 1
        try:
            self._emit(record)
        except Exception as err:
            logger.warning("lossguard: writing a gpu record failed (%s: %s)", type(err).__name__, err)
        return record

    # --- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_samples": self.n_samples,
            "n_records": self.n_records,
            "failures": self.failures,
            "sample_seconds": self.sample_seconds,
            "max_sample_seconds": self.max_sample_seconds,
            "context": self._context.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n_samples = int(state.get("n_samples", 0))
        self.n_records = int(state.get("n_records", 0))
        self.failures = int(state.get("failures", 0))
        self.sample_seconds = float(state.get("sample_seconds", 0.0))
        self.max_sample_seconds = float(state.get("max_sample_seconds", 0.0))
        with self._lock:
            self._context = GpuContext.from_dict(state.get("context"))


def build_record(
    timeline: Timeline, context: GpuContext | None = None, *, step: int | None = None, diagnose_it: bool = True
) -> dict[str, Any]:
    """The ``gpu`` telemetry record of a timeline: per-GPU aggregates, processes, diagnoses."""
    context = context or GpuContext()
    samples = timeline.samples
    record: dict[str, Any] = {"kind": "gpu", "t": round(samples[-1].t, 3) if samples else None}
    if step is not None:
        record["step"] = step
    record.update(
        interval_s=timeline.interval_s,
        n_samples=len(samples),
        t_start=round(samples[0].t, 3) if samples else None,
        gpus=[st.to_dict() for st in device_stats(timeline)],
        processes=[p.to_dict() for p in process_stats(timeline)],
    )
    ctx = context.to_dict()
    if ctx:
        record["context"] = ctx
    if diagnose_it:
        found = diagnose(
            timeline,
            world_size=context.world_size,
            parallel_mode=context.parallel_mode,
            hf_device_map=context.hf_device_map,
        )
        record["diagnoses"] = [d.to_dict() for d in found]
    return record


def timeline_from_records(records: list[Mapping[str, Any]]) -> Timeline:
    """A timeline rebuilt from ``gpu`` records, so a finished run can be diagnosed again.

    Utilization keeps its per-sample series; the other fields are the interval's aggregates
    repeated over its samples (memory at its peak, power and clock at their means), so the
    run-level diagnoses match the live ones on utilization and approximate them elsewhere.
    """
    devices: dict[int, DeviceInfo] = {}
    samples: list[TimelineSample] = []
    interval = 1.0
    for rec in records:
        gpus = [g for g in rec.get("gpus") or () if isinstance(g, Mapping) and isinstance(g.get("index"), int)]
        if not gpus:
            continue
        try:
            interval = float(rec.get("interval_s") or interval)
            t_start = float(rec.get("t_start") or rec.get("t") or 0.0)
        except (TypeError, ValueError):
            continue
        for g in gpus:
            devices.setdefault(g["index"], DeviceInfo(
                index=g["index"], uuid=g.get("uuid"), name=g.get("name"),
                memory_total_mib=_num(g.get("memory_total_mib")), power_limit_w=_num(g.get("power_limit_w")),
                sm_clock_max_mhz=_num(g.get("sm_clock_max_mhz")), mig=g.get("mig"),
            ))
        procs = tuple(
            ProcessReading(int(p["pid"]), int(p["gpu_index"]), _num(p.get("used_memory_mib")), str(p.get("name") or ""))
            for p in rec.get("processes") or ()
            if isinstance(p, Mapping) and isinstance(p.get("pid"), int) and isinstance(p.get("gpu_index"), int)
        )
        n = max(len(g.get("util_series") or ()) for g in gpus) or int(rec.get("n_samples") or 1)
        for i in range(n):
            readings = []
            for g in gpus:
                series = g.get("util_series") or ()
                readings.append(GpuReading(
                    index=g["index"],
                    util_gpu=_num(series[i]) if i < len(series) else _num(g.get("util_mean")),
                    util_mem=_num(g.get("util_mem_mean")),
                    memory_used_mib=_num(g.get("memory_used_mib")),
                    power_w=_num(g.get("power_w")),
                    sm_clock_mhz=_num(g.get("sm_clock_mhz")),
                    temp_c=_num(g.get("temp_c")),
                    throttle_reasons=tuple(str(r) for r in g.get("throttle_reasons") or ()),
                    sm_active=_num(g.get("sm_active_mean")),
                ))
            samples.append(TimelineSample(t_start + i * interval, tuple(readings), procs))
    return Timeline(interval, [devices[k] for k in sorted(devices)], samples)


def _num(value: Any) -> float | None:
    return as_float(value, finite=True)

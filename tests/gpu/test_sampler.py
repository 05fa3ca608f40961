"""The sampler thread: aggregates per interval, never blocks or breaks training, cheap per sample."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lossguard.gpu.diagnosis import diagnose
from lossguard.gpu.replay import ReplayBackend
from lossguard.gpu.sampler import (
    GpuSampler,
    build_record,
    infer_parallel_context,
    is_local_rank_zero,
    normalize_parallel_mode,
    timeline_from_records,
)
from lossguard.gpu.timeline import Timeline, TimelineSample
from lossguard.telemetry import EventWriter, read_events
from lossguard.telemetry.schema import encode

DATA = Path(__file__).parent.parent / "data" / "gpu"


def replay(name: str, **kw: Any) -> ReplayBackend:
    return ReplayBackend.from_file(DATA / f"{name}.json", **kw)


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def test_thread_samples_and_flush_emits_one_gpu_record() -> None:
    got: list[dict[str, Any]] = []
    sampler = GpuSampler(got.append, backend=replay("placement_two_gpus"), interval_s=0.005,
                         context={"world_size": 1, "parallel_mode": "model_parallel"})
    sampler.start()
    wait_for(lambda: sampler.n_samples >= 12)
    rec = sampler.flush(step=40)
    sampler.stop(flush=False)
    assert rec is not None and got == [rec]
    assert rec["kind"] == "gpu" and rec["step"] == 40 and rec["n_samples"] >= 12
    assert [g["index"] for g in rec["gpus"]] == [0, 1]
    g0, g1 = rec["gpus"]
    assert 70 <= g0["util_p50"] <= 90 and 16 <= g1["util_p50"] <= 40
    assert len(g0["util_series"]) == rec["n_samples"]
    assert {(p["pid"], p["gpu_index"]) for p in rec["processes"]} == {(4242, 0), (4242, 1)}
    assert [d["kind"] for d in rec["diagnoses"]] == ["placement_model_parallel"]
    assert rec["context"] == {"world_size": 1, "parallel_mode": "model_parallel"}
    json.loads(encode(rec))  # strict JSON for the telemetry log
    assert sampler.flush() is None or sampler.n_records == 2


def test_stop_joins_quickly_even_with_a_long_interval() -> None:
    got: list[dict[str, Any]] = []
    sampler = GpuSampler(got.append, backend=replay("ddp_balanced"), interval_s=30.0)
    sampler.start()
    wait_for(lambda: sampler.n_samples >= 1)
    t0 = time.perf_counter()
    rec = sampler.stop(step=7)
    assert time.perf_counter() - t0 < 0.2
    assert not sampler.running
    assert rec is not None and rec["step"] == 7 and rec["n_samples"] == 1 and got == [rec]


def test_replay_sample_costs_under_0_2_ms() -> None:
    sampler = GpuSampler(lambda r: None, backend=replay("ddp_balanced"))
    for _ in range(2000):
        assert sampler.sample_once()
    assert sampler.mean_sample_ms is not None and sampler.mean_sample_ms < 0.2
    t0 = time.perf_counter()
    rec = sampler.flush()
    flush_ms = 1000 * (time.perf_counter() - t0)
    assert rec is not None and rec["n_samples"] == 2000
    assert flush_ms < 500  # 2000 samples x 4 GPUs; a logging interval holds far fewer


def test_buffer_flushes_itself_when_full() -> None:
    got: list[dict[str, Any]] = []
    sampler = GpuSampler(got.append, backend=replay("data_starved"), interval_s=0.001, max_buffer=10)
    sampler.start()
    wait_for(lambda: len(got) >= 2)
    sampler.stop(flush=False)
    assert [r["n_samples"] for r in got[:2]] == [10, 10]
    assert "step" not in got[0]


def test_no_gpu_turns_sampling_off_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    def no_driver() -> ReplayBackend:
        return replay("no_driver")

    sampler = GpuSampler(lambda r: None, backend=no_driver, interval_s=0.001)
    with caplog.at_level("INFO", logger="lossguard"):
        sampler.start()
        wait_for(lambda: not sampler.running)
    assert sampler.unavailable == "no NVIDIA GPU found (NVML: driver library not found)"
    assert sampler.n_samples == 0 and sampler.stop() is None
    assert "GPU sampling off: no NVIDIA GPU found" in caplog.text


def test_real_backend_default_is_off_on_this_machine() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVIDIA driver")
    except pynvml.NVMLError:
        pass
    sampler = GpuSampler(lambda r: None)
    assert sampler.open() is False
    assert sampler.unavailable is not None and sampler.unavailable.startswith("no NVIDIA GPU found (NVML:")


class FailingBackend:
    def __init__(self, inner: ReplayBackend, fail_from: int):
        self.inner, self.fail_from, self.calls = inner, fail_from, 0

    def devices(self) -> list[Any]:
        return self.inner.devices()

    def sample(self) -> TimelineSample:
        self.calls += 1
        if self.calls > self.fail_from:
            raise RuntimeError("GPU fell off the bus")
        return self.inner.sample()

    def close(self) -> None:
        pass


def test_read_failures_and_emit_errors_never_escape(caplog: pytest.LogCaptureFixture) -> None:
    def broken_emit(rec: dict[str, Any]) -> None:
        raise OSError("disk full")

    backend = FailingBackend(replay("ddp_balanced"), fail_from=3)
    sampler = GpuSampler(broken_emit, backend=backend, interval_s=0.001)
    with caplog.at_level("WARNING", logger="lossguard"):
        sampler.start()
        wait_for(lambda: not sampler.running)
        rec = sampler.flush()
    assert sampler.n_samples == 3 and sampler.failures == 5
    assert rec is not None and rec["n_samples"] == 3
    assert "GPU sampling stopped after 5 failed reads" in caplog.text
    assert "writing a gpu record failed (OSError: disk full)" in caplog.text


def test_flush_from_two_threads_loses_and_duplicates_nothing() -> None:
    got: list[dict[str, Any]] = []
    lock = threading.Lock()

    def emit(rec: dict[str, Any]) -> None:
        with lock:
            got.append(rec)

    sampler = GpuSampler(emit, backend=replay("ddp_balanced"), interval_s=0.0005, max_buffer=7)
    sampler.start()
    for _ in range(30):
        sampler.flush()
        time.sleep(0.002)
    sampler.stop()
    assert sum(r["n_samples"] for r in got) == sampler.n_samples


def test_state_dict_round_trip() -> None:
    a = GpuSampler(lambda r: None, backend=replay("ddp_balanced"), context={"world_size": 4})
    for _ in range(5):
        a.sample_once()
    a.flush()
    a.set_context(parallel_mode="ddp", hf_device_map={"": 0})
    b = GpuSampler(lambda r: None, backend=replay("ddp_balanced"))
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict()
    assert b.state_dict()["context"] == {"world_size": 4, "parallel_mode": "ddp", "hf_device_map": {"": 0}}
    assert (b.n_samples, b.n_records) == (5, 1)


def test_bad_configuration_fails_loudly() -> None:
    with pytest.raises(ValueError, match="interval_s=0"):
        GpuSampler(lambda r: None, interval_s=0)
    with pytest.raises(ValueError, match="max_buffer=0"):
        GpuSampler(lambda r: None, max_buffer=0)


def test_records_written_to_the_log_rebuild_the_same_diagnosis(tmp_path: Path) -> None:
    t = Timeline.load(DATA / "ddp_straggler.json")
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        for k in range(0, 60, 10):
            chunk = Timeline(t.interval_s, t.devices, t.samples[k:k + 10])
            w.write_record(build_record(chunk, step=k + 10))
    records = [r for r in read_events(path) if r["kind"] == "gpu"]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    rebuilt = timeline_from_records(records)
    assert len(rebuilt.samples) == 60
    assert [s.gpus[2].util_gpu for s in rebuilt.samples] == [s.gpus[2].util_gpu for s in t.samples]
    assert [d.kind for d in diagnose(rebuilt)] == [d.kind for d in diagnose(t)]


def test_local_rank_and_parallel_mode_inference() -> None:
    assert is_local_rank_zero({}) and is_local_rank_zero({"LOCAL_RANK": "0"})
    assert not is_local_rank_zero({"LOCAL_RANK": "3"})
    assert normalize_parallel_mode("distributed", 4) == "ddp"
    assert normalize_parallel_mode("not_parallel", 1, {"a": 0, "b": "cuda:1"}) == "model_parallel"
    assert normalize_parallel_mode("not_parallel", 1) == "single"

    class Args:
        world_size = 1
        parallel_mode = "not_parallel"
        fsdp: list[str] = []
        deepspeed = None

    class Model:
        hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}

    ctx = infer_parallel_context(Args(), Model(), env={})
    assert ctx == {"world_size": 1, "parallel_mode": "model_parallel",
                   "hf_device_map": {"model.layers.0": 0, "model.layers.1": 1}}
    Args.world_size, Args.parallel_mode = 2, "distributed"
    assert infer_parallel_context(Args(), None, env={})["parallel_mode"] == "ddp"
    assert infer_parallel_context(Args(), None, env={"ACCELERATE_USE_FSDP": "true"})["parallel_mode"] == "fsdp"
    Args.deepspeed = "ds.json"  # type: ignore[assignment]
    assert infer_parallel_context(Args(), None, env={})["parallel_mode"] == "deepspeed"
    assert infer_parallel_context(None, None, env={"WORLD_SIZE": "8"}) == {"world_size": 8, "parallel_mode": "ddp"}


def test_real_transformers_training_arguments_give_single() -> None:
    from lossguard.testing.tiny import training_args

    ctx = infer_parallel_context(training_args("/tmp/unused-lossguard-gpu"), None, env={})
    assert ctx == {"world_size": 1, "parallel_mode": "single"}

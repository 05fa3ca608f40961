"""Diagnoses over recorded timelines: each situation gets its kind, numbers and advice, and only it."""

from __future__ import annotations

from pathlib import Path

from lossguard.gpu.diagnosis import UTIL_MEANS, DiagnosisKind, diagnose
from lossguard.gpu.stats import device_stats, process_stats
from lossguard.gpu.timeline import DeviceInfo, GpuReading, ProcessReading, Timeline, TimelineSample
from lossguard.records import Severity

DATA = Path(__file__).parent.parent / "data" / "gpu"


def load(name: str) -> Timeline:
    return Timeline.load(DATA / f"{name}.json")


def kinds(t: Timeline, **ctx: object) -> list[str]:
    return [d.kind.value for d in diagnose(t, **ctx)]  # type: ignore[arg-type]


def test_users_case_is_placement_model_parallelism() -> None:
    t = load("placement_two_gpus")
    found = diagnose(t)
    assert [d.kind for d in found] == [DiagnosisKind.PLACEMENT_MODEL_PARALLEL]
    d = found[0]
    assert d.severity is Severity.WARNING
    assert d.evidence["pid"] == 4242 and d.evidence["gpus"] == [0, 1]
    assert d.evidence["util_mean"] == {"0": 80.0, "1": 27.6}
    assert d.evidence["correlation"] < -0.8
    assert "GPU 0 averaged 80% and GPU 1 28%" in d.message and "PID 4242" in d.message
    assert UTIL_MEANS in d.message
    assert "torchrun --nproc_per_node=2" in d.advice and 'device_map={"": local_rank}' in d.advice
    assert 'device_map="balanced"' in d.advice


def test_placement_from_device_map_alone_and_context_in_message() -> None:
    t = load("placement_two_gpus")
    no_procs = Timeline(t.interval_s, t.devices, [TimelineSample(s.t, s.gpus, ()) for s in t.samples])
    guessed = diagnose(no_procs)
    assert [d.kind for d in guessed] == [DiagnosisKind.PLACEMENT_MODEL_PARALLEL]
    assert guessed[0].severity is Severity.INFO and guessed[0].message.startswith("possibly")
    hdm = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cuda:1", "lm_head": 1}
    found = diagnose(no_procs, world_size=1, parallel_mode="model_parallel", hf_device_map=hdm)
    assert found[0].severity is Severity.WARNING
    assert found[0].evidence["hf_device_map_gpus"] == [0, 1]
    assert "hf_device_map places the model on GPUs 0, 1" in found[0].message
    assert "parallel mode model_parallel, world size 1" in found[0].message


def test_balanced_ddp_has_no_diagnosis() -> None:
    t = load("ddp_balanced")
    assert diagnose(t, world_size=4, parallel_mode="ddp") == []
    assert [p.gpu_index for p in process_stats(t)] == [0, 1, 2, 3]


def test_straggler_rank_is_rank_imbalance_naming_the_slow_gpu() -> None:
    found = diagnose(load("ddp_straggler"), world_size=4, parallel_mode="ddp")
    assert [d.kind for d in found] == [DiagnosisKind.RANK_IMBALANCE]
    d = found[0]
    assert d.evidence["lowest_gpu"] == 2
    assert 30 <= d.evidence["spread_points"] <= 36
    assert d.evidence["world_size"] == 4 and d.evidence["parallel_mode"] == "ddp"
    assert d.message.startswith("GPU 2 averaged 61% while the other 3 averaged 92-94%")
    assert "world size 4" in d.message and UTIL_MEANS in d.message


def test_data_starved_square_wave_is_input_bound() -> None:
    found = diagnose(load("data_starved"))
    assert [d.kind for d in found] == [DiagnosisKind.INPUT_BOUND]
    d = found[0]
    assert d.evidence["util_p95"] > 70 and d.evidence["util_p5"] < 10
    assert "alternates between busy and idle" in d.message
    assert "dataloader_num_workers" in d.advice


def test_mig_with_unsupported_utilization_gives_na_not_a_guess() -> None:
    t = load("mig_unsupported")
    assert diagnose(t) == []
    (st,) = device_stats(t)
    assert st.mig is True and st.util_p50 is None and st.util_mean is None
    assert st.memory_used_mib == 18230.0 and st.power_w is not None


def test_stray_context_on_gpu0() -> None:
    found = diagnose(load("ddp_stray_context"), world_size=2, parallel_mode="ddp")
    assert [d.kind for d in found] == [DiagnosisKind.STRAY_CONTEXT]
    d = found[0]
    assert d.evidence["gpu"] == 0 and d.evidence["memory_mib"] == 514.0
    assert d.evidence["strays"] == [{"pid": 7101, "gpu": 0, "home_gpu": 1, "memory_mib": 514.0}]
    assert d.severity is Severity.INFO
    assert "PID 7101, which trains on GPU 1, also holds 514 MiB on GPU 0" in d.message
    assert "torch.cuda.set_device(local_rank)" in d.advice


def test_thermal_throttling() -> None:
    found = diagnose(load("thermal_throttle"))
    assert [d.kind for d in found] == [DiagnosisKind.THROTTLING]
    d = found[0]
    assert d.evidence["share"] == 0.5 and d.evidence["reasons"] == ["hw_thermal", "sw_thermal"]
    assert 1100 <= d.evidence["sm_clock_mhz"] <= 1160 and d.evidence["sm_clock_max_mhz"] == 2520.0
    assert "up to 87 C" in d.message and "cooling" in d.advice


def _steady(util: float, mem_used: float, n: int = 20) -> Timeline:
    dev = DeviceInfo(0, "GPU-0", "NVIDIA L4", 23034.0, 72.0, 2040.0)
    samples = [
        TimelineSample(float(k), (GpuReading(0, util_gpu=util, memory_used_mib=mem_used, sm_clock_mhz=2040.0),),
                       (ProcessReading(1, 0, mem_used, "python"),))
        for k in range(n)
    ]
    return Timeline(1.0, [dev], samples)


def test_low_steady_util_with_little_memory_is_small_batch_else_input_bound() -> None:
    small = diagnose(_steady(45.0, 3000.0))
    assert [d.kind for d in small] == [DiagnosisKind.SMALL_BATCH]
    assert small[0].evidence["memory_share"] == 0.13
    assert "per_device_train_batch_size" in small[0].advice
    assert kinds(_steady(45.0, 20000.0)) == ["input_bound"]
    assert kinds(_steady(90.0, 3000.0)) == []


def test_too_few_samples_give_no_utilization_diagnosis() -> None:
    assert kinds(_steady(45.0, 3000.0, n=4)) == []


def test_idle_gpus_without_processes_are_ignored() -> None:
    t = load("data_starved")
    idle = DeviceInfo(1, "GPU-idle", "NVIDIA A100-SXM4-80GB", 81920.0, 400.0, 1410.0)
    samples = [TimelineSample(s.t, (*s.gpus, GpuReading(1, util_gpu=0.0, memory_used_mib=4.0)), s.processes)
               for s in t.samples]
    assert kinds(Timeline(1.0, [*t.devices, idle], samples)) == ["input_bound"]


def test_every_diagnosis_serialises_with_the_five_fields() -> None:
    import json

    for name in ("placement_two_gpus", "ddp_straggler", "data_starved", "ddp_stray_context", "thermal_throttle"):
        for d in diagnose(load(name)):
            out = json.loads(json.dumps(d.to_dict(), allow_nan=False))
            assert set(out) == {"kind", "severity", "message", "advice", "evidence"}
            assert UTIL_MEANS in out["message"]

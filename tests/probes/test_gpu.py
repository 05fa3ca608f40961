"""NVML backends, the failure chokepoint, CUDA_VISIBLE_DEVICES mapping and the timeline format."""

from __future__ import annotations

import json
from pathlib import Path

import pynvml
import pytest

from lossguard.errors import LossguardError
from lossguard.probes.gpu import (
    DeviceInfo,
    NvmlUnavailable,
    RealNvmlBackend,
    ReplayBackend,
    Timeline,
    TimelineError,
    normalize_uuid,
    nvml_get,
    nvml_index_for_uuid,
    throttle_names,
    visible_nvml_indices,
)

DATA = Path(__file__).parent.parent / "data" / "gpu"
UUIDS = ["GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", "GPU-1a2b3c4d-0000-1111-2222-333344445555", None]


def _nvml_present() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_nvml_present(), reason="this machine has a working NVIDIA driver")
def test_real_nvml_init_fails_with_one_clear_line() -> None:
    with pytest.raises(NvmlUnavailable) as info:
        RealNvmlBackend()
    assert str(info.value) == "no NVIDIA GPU found (NVML: driver library not found)"
    assert info.value.reason == "driver library not found"
    assert isinstance(info.value, LossguardError)


def test_chokepoint_turns_nvml_errors_into_none_and_keeps_other_bugs() -> None:
    def unsupported() -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def lost() -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    assert nvml_get(unsupported) is None
    assert nvml_get(lost) is None
    assert nvml_get(pynvml.nvmlDeviceGetCount) is None  # uninitialised / no library on this machine
    assert nvml_get(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        nvml_get(lambda: 1 / 0)


def test_visible_devices_by_index_uuid_and_prefix() -> None:
    assert visible_nvml_indices(None, UUIDS) == [0, 1, 2]
    assert visible_nvml_indices("", UUIDS) == []
    assert visible_nvml_indices("1,0", UUIDS) == [1, 0]
    assert visible_nvml_indices(" 2 ", UUIDS) == [2]
    assert visible_nvml_indices("GPU-1a2b3c4d-0000-1111-2222-333344445555", UUIDS) == [1]
    assert visible_nvml_indices("GPU-8932f937,1", UUIDS) == [0, 1]
    assert visible_nvml_indices("gpu-8932F937", UUIDS) == [0]


def test_visible_devices_stop_at_first_invalid_entry_like_cuda() -> None:
    assert visible_nvml_indices("0,7,1", UUIDS) == [0]
    assert visible_nvml_indices("1,1,0", UUIDS) == [1]
    assert visible_nvml_indices("-1,0", UUIDS) == []
    assert visible_nvml_indices("GPU-ffff,0", UUIDS) == []
    assert visible_nvml_indices("GPU-,0", UUIDS) == []  # ambiguous prefix of both UUIDs


def test_visible_mig_devices_resolve_through_the_parent_lookup() -> None:
    parents = {"MIG-aaaa": 1}
    assert visible_nvml_indices("MIG-aaaa", UUIDS, parents.get) == [1]
    assert visible_nvml_indices("MIG-bbbb,0", UUIDS, parents.get) == []
    assert visible_nvml_indices("MIG-aaaa", UUIDS) == []


def test_torch_style_uuid_maps_to_nvml_index() -> None:
    devices = [DeviceInfo(index=i, uuid=u) for i, u in enumerate(UUIDS)]
    assert normalize_uuid("8932f937-d72c-4106-c12f-20bd9faed9f6") == UUIDS[0]
    assert normalize_uuid(b"GPU-ABC") == "GPU-abc"
    assert nvml_index_for_uuid("1a2b3c4d-0000-1111-2222-333344445555", devices) == 1
    assert nvml_index_for_uuid("deadbeef", devices) is None


def test_throttle_bitmask_names() -> None:
    assert throttle_names(None) == ()
    assert throttle_names(0) == ()
    assert throttle_names(0x1 | 0x20 | 0x40) == ("gpu_idle", "sw_thermal", "hw_thermal")
    assert throttle_names(0x4) == ("sw_power_cap",)


def test_timeline_round_trip_is_exact(tmp_path: Path) -> None:
    original = Timeline.load(DATA / "placement_two_gpus.json")
    path = tmp_path / "t.json"
    original.save(path)
    again = Timeline.load(path)
    assert again == original
    assert again.to_dict() == json.loads((DATA / "placement_two_gpus.json").read_text())
    assert len(again.samples) == 60 and [d.index for d in again.devices] == [0, 1]
    assert again.samples[0].processes[0].pid == 4242


def test_mig_fixture_keeps_unsupported_fields_as_none() -> None:
    t = Timeline.load(DATA / "mig_unsupported.json")
    assert t.devices[0].mig is True
    g = t.samples[0].gpus[0]
    assert g.util_gpu is None and g.util_mem is None
    assert g.memory_used_mib == 18230.0
    assert t.samples[0].processes == ()


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"version": 2, "devices": [], "samples": []}', "unsupported timeline version 2"),
        ('{"version": 1, "devices": []}', "'samples' must be a list"),
        ('{"version": 1, "interval_s": 0, "devices": [], "samples": []}', "interval_s=0 must be a positive number"),
        ('{"version": 1, "devices": [{"name": "x"}], "samples": []}', "missing field 'index'"),
        ('{"version": 1, "devices": [], "samples": [{"t": 1, "gpus": [{"index": 0, "util_gpu": "high"}]}]}',
         "expected a number or null, got 'high'"),
    ],
)
def test_bad_timeline_files_fail_with_one_line_naming_the_file(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TimelineError) as info:
        Timeline.load(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and problem in msg and "\n" not in msg


def test_timeline_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TimelineError, match="is a directory"):
        Timeline.load(tmp_path)


def test_replay_plays_in_order_then_loops_or_stops() -> None:
    t = Timeline.load(DATA / "data_starved.json")
    looping = ReplayBackend(t)
    times = [looping.sample().t for _ in range(61)]
    assert times[:3] == [t.samples[0].t, t.samples[1].t, t.samples[2].t]
    assert times[60] == t.samples[0].t
    once = ReplayBackend(t, loop=False)
    for _ in range(60):
        once.sample()
    with pytest.raises(IndexError):
        once.sample()
    clocked = ReplayBackend(t, clock=lambda: 123.0)
    s = clocked.sample()
    assert s.t == 123.0 and s.gpus == t.samples[0].gpus
    assert [d.name for d in looping.devices()] == ["NVIDIA A100-SXM4-80GB"]


def test_replay_of_a_no_driver_recording_is_unavailable() -> None:
    with pytest.raises(NvmlUnavailable) as info:
        ReplayBackend.from_file(DATA / "no_driver.json")
    assert str(info.value) == "no NVIDIA GPU found (NVML: driver library not found)"
    with pytest.raises(NvmlUnavailable, match="no GPU sample"):
        ReplayBackend(Timeline(1.0, [DeviceInfo(0)], []))

"""The live NVML backend, the failure chokepoint and the CUDA_VISIBLE_DEVICES mapping."""

from __future__ import annotations

from pathlib import Path

import pynvml
import pytest

from lossguard.errors import LossguardError
from lossguard.gpu.nvml import (
    NvmlUnavailable,
    RealNvmlBackend,
    normalize_uuid,
    nvml_get,
    nvml_index_for_uuid,
    throttle_names,
    visible_nvml_indices,
)
from lossguard.gpu.timeline import DeviceInfo

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

"""What preflight reads from the model: parameter counts, the adapter, placement, dtypes, the GPU."""

from __future__ import annotations

from typing import Any

from lossguard.preflight.readers import attr


def count_params(model: Any) -> tuple[int, int] | None:
    if model is None:
        return None
    counter = getattr(model, "get_nb_trainable_parameters", None)
    if callable(counter):
        try:
            trainable, total = counter()
            return int(total), int(trainable)
        except Exception:
            pass
    params = getattr(model, "parameters", None)
    if not callable(params):
        return None
    total = trainable = 0
    for p in params():
        n = int(getattr(p, "ds_numel", 0) or p.numel())
        if p.__class__.__name__ == "Params4bit":
            # bitsandbytes packs two 4-bit values per byte of storage
            n *= 2 * int(getattr(getattr(p, "quant_storage", None), "itemsize", 1) or 1)
        total += n
        if getattr(p, "requires_grad", False):
            trainable += n
    return total, trainable


def peft_config(model: Any) -> Any:
    configs = attr(model, "peft_config")
    if not isinstance(configs, dict) or not configs:
        return None
    active = attr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0] if active else None
    if isinstance(active, str) and active in configs:
        return configs[active]
    return next(iter(configs.values()))


def model_name(model: Any) -> str:
    config = attr(model, "config")
    return str(attr(config, "_name_or_path", "") or attr(config, "name_or_path", "") or "")


def device_map_gpus(model: Any) -> tuple[list[str], list[str]]:
    device_map = attr(model, "hf_device_map")
    if not isinstance(device_map, dict):
        return [], []
    gpus: set[str] = set()
    offload: set[str] = set()
    for dev in device_map.values():
        name = str(dev)
        if name in ("cpu", "disk"):
            offload.add(name)
        elif name.isdigit() or name.startswith(("cuda", "xpu", "npu", "mps")):
            gpus.add(f"cuda:{name}" if name.isdigit() else name)
    return sorted(gpus), sorted(offload)


def gpu_info() -> tuple[bool, bool, str]:
    try:
        import torch

        if not torch.cuda.is_available():
            return False, False, ""
        return True, bool(torch.cuda.is_bf16_supported()), str(torch.cuda.get_device_name(0))
    except Exception:
        return False, False, ""


def trainable_dtypes(model: Any) -> set[str]:
    params = getattr(model, "parameters", None)
    if not callable(params):
        return set()
    return {str(p.dtype).replace("torch.", "") for p in params() if getattr(p, "requires_grad", False)}

"""Measuring what a snapshot will cost, once, at train begin (the model is in ``budget.py``).

Everything here is small and bounded, and each time is the median of ``REPEATS`` tries: a copy of
at most ``CAPTURE_SAMPLE_BYTES`` of the trainable parameters off their device, and the finite check
a scheduled snapshot makes of them; a ``DISK_SAMPLE_BYTES`` spill written into the spill folder by
the spill's own writer (fsynced) and deleted; the host's ``MemAvailable``; the probe's memory
estimate (``probes.probe_cost.probe_memory``, passed in by the integration) against the device's
free memory.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lossguard.recovery.budget import DEFAULT_EVERY, SnapshotCost
from lossguard.recovery.sharding import local_tensor
from lossguard.recovery.snapshot import Snapshot, all_finite, save_snapshot, trainable_parameters, unwrap

logger = logging.getLogger("lossguard")

CAPTURE_SAMPLE_BYTES = 128 * 2**20
DISK_SAMPLE_BYTES = 32 * 2**20
REPEATS = 3  # each measurement is the median of this many


def optimizer_bytes(optimizer: Any, params: list[torch.Tensor]) -> tuple[int, bool]:
    """The optimizer state's bytes for ``params``, and whether that is an estimate (no state yet).

    With state (a resumed run, a later call): what its tensors hold. Without: from the type,
    the way torch creates it at the first step: Adam/AdamW two moments like the parameter
    (three with amsgrad), SGD one momentum buffer when momentum is on, others assumed Adam-like.
    """
    opt = unwrap(optimizer) if optimizer is not None else None
    if opt is None:
        return 0, False
    held = sum(local_tensor(v).numel() * v.element_size() for entry in getattr(opt, "state", {}).values()
               for v in entry.values() if isinstance(v, torch.Tensor))
    if held:
        return held, False
    like = sum(p.numel() * p.element_size() for p in params)
    defaults = getattr(opt, "defaults", {}) or {}
    name = type(opt).__name__
    if name in ("SGD",):
        copies = 1 if defaults.get("momentum", 0) else 0
    elif name in ("Adam", "AdamW"):
        copies = 3 if defaults.get("amsgrad") else 2
    else:
        copies = 2
    return copies * like, True


def _sample(params: list[torch.Tensor], sample_bytes: int) -> tuple[list[torch.Tensor], int]:
    """The first trainable tensors, flattened, up to ``sample_bytes`` (the last one cut short)."""
    picked, total = [], 0
    for p in params:
        if total >= sample_bytes:
            break
        n = min(p.numel(), max(1, (sample_bytes - total) // p.element_size()))
        picked.append(p.detach().reshape(-1)[:n])
        total += n * p.element_size()
    return picked, total


def _median_rate(nbytes: int, times: list[float]) -> float | None:
    times = sorted(t for t in times if t > 0)
    return nbytes / times[len(times) // 2] if times else None


def measure_capture(params: list[torch.Tensor], sample_bytes: int = CAPTURE_SAMPLE_BYTES,
                    clock: Callable[[], float] = time.perf_counter, repeats: int = REPEATS) -> float | None:
    """Bytes per second of copying trainable tensors off their device into fresh CPU memory, the way
    ``Capturer`` does (one ``cat`` per chunk, then to the host), on at most ``sample_bytes``: the
    median of ``repeats`` copies (one copy on a shared machine is off by tens of percent)."""
    picked, total = _sample(params, sample_bytes)
    if not total:
        return None
    by_key: dict[tuple[Any, Any], list[torch.Tensor]] = {}
    for t in picked:
        by_key.setdefault((t.device, t.dtype), []).append(t)
    on_cuda = any(d.type == "cuda" for d, _ in by_key)
    times = []
    with torch.no_grad():
        # on CUDA the capturer copies into reused pinned buffers: allocated here before the clock starts
        targets = {k: torch.empty(sum(t.numel() for t in g), dtype=k[1], pin_memory=True)
                   for k, g in by_key.items() if k[0].type == "cuda"}
        for _ in range(max(1, repeats)):
            if on_cuda:
                torch.cuda.synchronize()
            t0 = clock()
            for key, group in by_key.items():
                if key in targets:
                    off = 0
                    for t in group:
                        targets[key][off:off + t.numel()].copy_(t, non_blocking=True)
                        off += t.numel()
                else:
                    flat = torch.cat(group)  # what the capturer does on the host: one fresh buffer
                    del flat
            if on_cuda:
                torch.cuda.synchronize()
            times.append(clock() - t0)
    return _median_rate(total, times)


def measure_check(params: list[torch.Tensor], sample_bytes: int = CAPTURE_SAMPLE_BYTES,
                  clock: Callable[[], float] = time.perf_counter, repeats: int = REPEATS) -> float | None:
    """Bytes per second of the finite check a scheduled snapshot makes of the trainable parameters
    (``snapshot.all_finite``, a damaged state is no rollback target), on the same sample."""
    picked, total = _sample(params, sample_bytes)
    if not total:
        return None
    on_cuda = any(t.device.type == "cuda" for t in picked)
    times = []
    with torch.no_grad():
        for _ in range(max(1, repeats)):
            if on_cuda:
                torch.cuda.synchronize()
            t0 = clock()
            for t in picked:
                all_finite(t)
            times.append(clock() - t0)
    return _median_rate(total, times)


def measure_disk(folder: Path | None, nbytes: int = DISK_SAMPLE_BYTES,
                 clock: Callable[[], float] = time.perf_counter, repeats: int = REPEATS) -> float | None:
    """Bytes per second of spilling ``nbytes`` into ``folder`` through the spill's own writer
    (``save_snapshot``: safetensors, the rest pickled, every file fsynced, renamed into place), the
    median of ``repeats`` writes; None on failure. The sample files are deleted."""
    if folder is None:
        return None
    scratch = folder / f".lossguard-disk-check-{os.getpid()}"
    sample = Snapshot(step=0, params={"sample": torch.randint(0, 255, (max(1, nbytes),), dtype=torch.uint8)},
                      optimizer=None, rng=None, engine=None)
    times = []
    try:
        for _ in range(max(1, repeats)):
            t0 = clock()
            written = save_snapshot(sample, scratch)
            times.append(clock() - t0)
            shutil.rmtree(written, ignore_errors=True)
    except Exception as err:  # OSError, or safetensors' SafetensorError on a full disk
        logger.info("lossguard: could not measure the spill folder's bandwidth (%s)", err)
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _median_rate(nbytes, times)


def _unknown_memory(device: Any) -> tuple[int | None, int | None]:
    return None, None


def measure_cost(model: Any, optimizer: Any, *, memory_mb: float, spill_dir: Path | None, world_size: int = 1,
                 max_steps: int | None = None,
                 free_memory: Callable[[Any], tuple[int | None, int | None]] = _unknown_memory,
                 probe_memory: Callable[[int], int | None] | None = None) -> SnapshotCost:
    """What a snapshot of ``model``'s trainable state with ``optimizer``'s costs on this rank.

    The disk is measured only when the run's snapshots at the finest cadence (``max_steps``
    unknown: any run) would not all fit the in-memory cap, with a write no larger than a snapshot.
    ``free_memory(device)`` (device, host bytes free) and ``probe_memory(n_trainable)`` (the
    probe's device bytes) come from the probes package, which recovery does not import: the
    integration passes them (``integrations/core.py``).
    """
    params = [local_tensor(p) for p in trainable_parameters(model).values()]  # sharded: this rank's part
    n = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    opt_bytes, estimated = optimizer_bytes(optimizer, params)
    device = params[0].device if params else torch.device("cpu")
    dev_free, host_free = free_memory(device)
    size, cap = param_bytes + opt_bytes, int(memory_mb * 2**20)
    spills = max_steps is None or max_steps <= 0 or size * (max_steps // DEFAULT_EVERY + 1) > cap
    disk = measure_disk(spill_dir, max(2**20, min(DISK_SAMPLE_BYTES, size))) if spills else None
    return SnapshotCost(
        trainable_params=n, param_bytes=param_bytes, optimizer_bytes=opt_bytes, optimizer_estimated=estimated,
        capture_bytes_per_s=measure_capture(params), check_bytes_per_s=measure_check(params), disk_bytes_per_s=disk,
        host_available=host_free, memory_cap=cap, world_size=world_size,
        probe_bytes=probe_memory(n) if n and probe_memory is not None else None,
        device_free=dev_free if device.type != "cpu" else None)

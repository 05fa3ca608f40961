"""Run arithmetic: processes, batch, optimizer steps per epoch and in total."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from lossguard.numbers import as_float
from lossguard.preflight.readers import attr, positive_int


def interval(value: Any, total_steps: int | None) -> int | None:
    """A ``logging_steps``/``save_steps`` value in steps (values below 1 are a share of the run)."""
    f = as_float(value, finite=True)
    if f is None or f <= 0:
        return None
    if f < 1:
        return max(1, math.ceil(f * total_steps)) if total_steps else None
    return int(f)


@dataclass
class Run:
    """How the Trainer will run: processes, sequences per micro-batch, accumulation, rows and steps."""

    world_size: int
    micro_batch: int
    grad_accum: int
    rows: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    epochs: float | None


def world_size_of(args: Any, world_size: int | None) -> int:
    if world_size is not None and world_size >= 1:
        return int(world_size)
    ws = positive_int(attr(args, "world_size"))
    if ws:
        return ws
    return positive_int(os.environ.get("WORLD_SIZE")) or 1


def run_facts(args: Any, world_size: int, n_rows: int | None, model_parallel: bool) -> Run:
    per_device = positive_int(attr(args, "per_device_train_batch_size")) or 8
    n_gpu = 1
    if world_size == 1 and not model_parallel:
        n_gpu = positive_int(attr(args, "n_gpu")) or 1
    micro = per_device * max(1, n_gpu)  # the Trainer wraps several visible GPUs in DataParallel
    grad_accum = positive_int(attr(args, "gradient_accumulation_steps")) or 1
    steps_per_epoch = None
    if n_rows:
        per_rank = math.ceil(n_rows / world_size)
        drop_last = bool(attr(args, "dataloader_drop_last", False))
        batches = per_rank // micro if drop_last else math.ceil(per_rank / micro)
        steps_per_epoch = max(math.ceil(batches / grad_accum), 1)
    max_steps = positive_int(attr(args, "max_steps"))
    try:
        epochs: float | None = float(attr(args, "num_train_epochs", 3.0))
    except (TypeError, ValueError):
        epochs = None
    if max_steps:
        total = max_steps
        epochs = total / steps_per_epoch if steps_per_epoch else None
    elif steps_per_epoch and epochs:
        total = math.ceil(epochs * steps_per_epoch)
    else:
        total = None
    return Run(world_size, micro, grad_accum, n_rows, steps_per_epoch, total, epochs)

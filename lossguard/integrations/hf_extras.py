"""What ``LossGuard`` adds to a Trainer run besides the engine: the preflight report and the GPU
sampler at train begin (both optional: a failure logs one warning and the run goes on without
them), and the ``lossguard/*`` keys it adds to the Trainer's logs."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from lossguard.config import GuardConfig
from lossguard.integrations.core import Reporter
from lossguard.integrations.run_info import world_size
from lossguard.records import Sample
from lossguard.telemetry.writer import EventWriter

logger = logging.getLogger("lossguard")


OWNER_MARK = "_lossguard_owner"  # on the TrainerState: the LossGuard that took this train() call


def claim_run(state: Any, callback: Any) -> bool:
    """Whether ``callback`` is the LossGuard of this ``train()`` call: the first to begin. A second
    one on the same Trainer would cut the LR twice and set the first one's log aside; it is told
    so in one warning line. The mark lives on the ``TrainerState``, which is new per ``train()``
    call and saves only its fields."""
    try:
        first = getattr(state, OWNER_MARK, None)
        if first is not None and first is not callback:
            logger.warning("lossguard: this Trainer already has a LossGuard, which records and recovers; "
                           "this second one is switched off (pass a single LossGuard in callbacks=[...])")
            return False
        setattr(state, OWNER_MARK, callback)
    except Exception as err:  # an unusual state object: no duplicate check
        logger.debug("lossguard: duplicate check skipped (%s)", err)
    return True


def run_first(trainer: Any, callback: Any) -> None:
    """Move ``callback`` to the front of the Trainer's callbacks, so that the keys it adds in
    ``on_log`` reach the reporting callbacks (TensorBoard, W&B) that follow it."""
    handler = getattr(trainer, "callback_handler", None)
    if handler is not None and callback in handler.callbacks:
        handler.callbacks.remove(callback)
        handler.callbacks.insert(0, callback)


def run_preflight(report: Reporter, config: GuardConfig, args: Any, model: Any, loader: Any, trainer: Any,
                  cost: Any = None) -> None:
    """Check the run's set-up before the first step; write the ``preflight`` record and print its table
    (with the recovery cost model's rows when ``cost`` was measured)."""
    if not report.is_main:
        return
    try:
        from lossguard.preflight import preflight

        checks = preflight(args, model, loader if loader is not None else getattr(trainer, "train_dataset", None),
                           world_size=world_size(args),
                           rollback_steps=config.recovery.rollback_steps if config.recovery.enabled else 0,
                           data_collator=None if loader is not None else getattr(trainer, "data_collator", None),
                           recovery_cost=cost, snapshot_budget=config.recovery.snapshot_budget,
                           snapshot_every=config.recovery.snapshot_every)
    except Exception as err:
        logger.warning("lossguard: preflight skipped (%s)", err)
        return
    report.write_record(checks.to_record())
    if config.console:
        from lossguard.presentation.console import console, print_fitted
        from lossguard.presentation.preflight_table import preflight_table

        print_fitted(console(), preflight_table(checks))


def start_gpu_sampler(report: Reporter, config: GuardConfig, args: Any, model: Any, log_dir: Path,
                      backend: Any = None) -> Any:
    """The running GPU sampler of this machine (on its local rank 0), or None: not on a GPU, turned
    off, another local rank, or it could not start."""
    try:
        import torch

        on_gpu = torch.cuda.is_available() and not getattr(args, "use_cpu", False)
        if not config.gpu.enabled or not (on_gpu or backend):
            return None  # before the sampler's import, which a CPU-only run need not pay
        from lossguard.gpu.sampler import GpuSampler, infer_parallel_context, is_local_rank_zero

        if not is_local_rank_zero():
            return None
        if report.is_main and report.writer is not None:
            emit = report.writer.write_record
        else:  # local rank 0 of another node: its own file
            emit = EventWriter(log_dir / f"gpu.rank{args.process_index}.jsonl").write_record
        sampler = GpuSampler(emit, backend=backend, interval_s=config.gpu.interval_s,
                             context=infer_parallel_context(args, model))
        sampler.start()
        return sampler
    except Exception as err:
        logger.warning("lossguard: GPU sampler not started (%s)", err)
        return None


def interval_logs(samples: list[Sample], report: Reporter) -> dict[str, float]:
    """The ``lossguard/*`` keys for the Trainer's log of the steps ``samples`` (since its last
    log), which its reporters (TensorBoard, W&B) pass on."""
    losses = [s.loss for s in samples if s.loss is not None]
    norms = [s.grad_norm for s in samples if s.grad_norm is not None]
    out = {"lossguard/nonfinite_steps": float(sum(1 for v in losses if not math.isfinite(v)))}
    if norms:
        out["lossguard/grad_norm_max"] = max(norms)
    out["lossguard/findings"] = float(len(report.findings))
    out["lossguard/rollbacks"] = float(report.rollbacks())
    return out

"""Preflight: what this training run will do, checked before the first step.

``preflight(args, model, train_dataset)`` reads the ``TrainingArguments``, the model and a sample
of the training data and answers the questions people otherwise find out hours later: how many
sequences one optimizer step sees, when the loss will be printed, whether the checkpoints are
close enough together to roll back, how much the run actually trains, whether the data has
enough supervised tokens to matter, whether the prompts are masked with ``-100``, whether the
precision suits the GPU and whether ``device_map="auto"`` split the model over several GPUs.

Every row is informational; nothing here changes training. Odd input never raises: a check that
cannot read what it needs is skipped (and logged at debug level).

Token rule of thumb (from the user's notes): fine-tuning on fewer tokens than about
``1e-5 x parameters`` (1/100,000; 10k tokens for a 1B-parameter model) will likely have little
effect. The notes also write "~0.000001 x" once, but their own example (1B -> 10k) and the
"1/100,000" sentence both mean 1e-5, which is what is used here. Chinchilla's ~20 tokens per
parameter is the budget for pre-training from scratch and is shown only as a reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from lossguard.preflight.checks import (
    CHINCHILLA_TOKENS_PER_PARAM,
    FINETUNE_TOKENS_PER_PARAM,
    INSTRUCTION_COLUMNS,
    MIN_LOGGED_POINTS,
    check_batch,
    check_logging,
    check_lora,
    check_masking,
    check_params,
    check_placement,
    check_precision,
    check_saving,
    check_steps,
    check_tokens,
)
from lossguard.preflight.model import count_params, device_map_gpus, gpu_info
from lossguard.preflight.readers import attr, dataset_len
from lossguard.preflight.recovery_cost import check_recovery_cost
from lossguard.preflight.report import PreflightReport, PreflightRow, Status
from lossguard.preflight.run import run_facts, world_size_of
from lossguard.preflight.tokens import COLLATE_BATCH, IGNORE_INDEX, TokenAudit, audit_dataset, unwrap_loader

__all__ = [
    "CHINCHILLA_TOKENS_PER_PARAM",
    "COLLATE_BATCH",
    "FINETUNE_TOKENS_PER_PARAM",
    "IGNORE_INDEX",
    "INSTRUCTION_COLUMNS",
    "MIN_LOGGED_POINTS",
    "PreflightReport",
    "PreflightRow",
    "Status",
    "preflight",
]

logger = logging.getLogger("lossguard")


def _safe(rows: list[PreflightRow], check: Callable[[], Iterable[PreflightRow]], name: str) -> None:
    try:
        rows.extend(check())
    except Exception as err:  # one unreadable input skips its row, never the report or training
        logger.debug("lossguard: preflight check %s skipped (%s: %s)", name, type(err).__name__, err)


def preflight(
    args: Any,
    model: Any,
    train_dataset: Any = None,
    *,
    world_size: int | None = None,
    rollback_steps: int = 100,
    data_collator: Callable[[list[Any]], Any] | None = None,
    sample_limit: int = 2000,
    recovery_cost: Any = None,
    snapshot_budget: float = 0.01,
    snapshot_every: int | None = None,
) -> PreflightReport:
    """Check a fine-tuning set-up before training and say what to change.

    Args:
        args: the ``TrainingArguments`` (or any object with the same attribute names).
        model: the model as it will be trained (a peft model, a 4-bit model, a plain module).
        train_dataset: a list of dicts, a torch ``Dataset``, a Hugging Face ``datasets.Dataset``
            or a ``DataLoader`` (its dataset and collate_fn are used); rows with ``input_ids``
            and, ideally, ``labels``. At most ``sample_limit`` rows are read (the report says so).
        world_size: number of training processes; defaults to ``args.world_size`` / ``WORLD_SIZE``.
        rollback_steps: lossguard's rollback distance, to judge the checkpoint cadence; 0 when
            recovery is off (nothing is said about rollbacks then).
        data_collator: applied to the sampled rows so the audit sees labels as the model will
            (``DataCollatorForLanguageModeling`` replaces the dataset's labels, for example).
        sample_limit: the most dataset rows to read.
        recovery_cost: the recovery cost model's measurements (``recovery.budget.SnapshotCost``),
            worded as rows with ``snapshot_budget`` and ``snapshot_every`` (``recovery_cost.py``).

    Returns:
        A ``PreflightReport``; ``report.warnings`` lists what to change, one sentence each.
    """
    rows: list[PreflightRow] = []
    facts: dict[str, Any] = {}
    gpus, _ = device_map_gpus(model)
    ws = world_size_of(args, world_size)
    dataset, collator = unwrap_loader(train_dataset, data_collator)
    run = run_facts(args, ws, dataset_len(dataset), model_parallel=len(gpus) > 1)
    counts: tuple[int, int] | None = None
    try:
        counts = count_params(model)
    except Exception as err:
        logger.debug("lossguard: preflight could not count parameters (%s)", err)
    config = attr(model, "config")
    shift = not bool(attr(config, "is_encoder_decoder", False))
    pad_id = attr(config, "pad_token_id")
    audit: TokenAudit | None = None
    try:
        audit = audit_dataset(dataset, collator, sample_limit, shift, pad_id if isinstance(pad_id, int) else None)
    except Exception as err:
        logger.debug("lossguard: preflight could not audit the dataset (%s)", err)

    _safe(rows, lambda: check_batch(args, run), "batch")
    _safe(rows, lambda: check_steps(run, rollback_steps), "steps")
    _safe(rows, lambda: check_logging(args, run, rollback_steps), "logging")
    _safe(rows, lambda: check_saving(args, run, rollback_steps), "saving")
    _safe(rows, lambda: check_params(counts), "params")
    _safe(rows, lambda: check_lora(model, counts), "lora")
    _safe(rows, lambda: check_tokens(audit, counts), "tokens")
    _safe(rows, lambda: check_masking(audit, model), "masking")
    _safe(rows, lambda: check_precision(args, model, gpu_info()), "precision")
    _safe(rows, lambda: check_placement(model, ws), "placement")
    if recovery_cost is not None:
        _safe(rows, lambda: check_recovery_cost(recovery_cost, snapshot_budget=snapshot_budget,
                                                snapshot_every=snapshot_every), "recovery cost")
        facts["recovery_cost"] = recovery_cost.summary()

    facts.update(
        world_size=ws,
        effective_batch=run.micro_batch * run.grad_accum * run.world_size,
        steps_per_epoch=run.steps_per_epoch,
        total_steps=run.total_steps,
        rollback_steps=rollback_steps,
    )
    if counts is not None:
        facts.update(params_total=counts[0], params_trainable=counts[1])
    if audit is not None:
        facts.update(
            rows_total=audit.rows_total,
            rows_sampled=audit.rows_seen,
            sampled=audit.sampled,
            tokens_estimate=round(audit.scale(audit.tokens)),
            supervised_tokens_estimate=round(audit.scale(audit.supervised)) if audit.rows_with_labels else None,
            masked_share=(audit.masked_positions / audit.label_positions) if audit.label_positions else None,
            rows_nothing_to_learn=audit.rows_nothing_to_learn,
            rows_unmasked=audit.rows_unmasked,
        )
    if gpus:
        facts["device_map_gpus"] = gpus
    return PreflightReport(rows=rows, facts=facts)

"""The checks: each reads the run, the model or the token audit and returns preflight rows."""

from __future__ import annotations

import math
import os
from typing import Any

from lossguard.preflight.model import device_map_gpus, model_name, peft_config, trainable_dtypes
from lossguard.preflight.readers import attr, enum_text, human, positive_int
from lossguard.preflight.report import PreflightRow, Status
from lossguard.preflight.run import Run, interval
from lossguard.preflight.tokens import TokenAudit

FINETUNE_TOKENS_PER_PARAM = 1e-5
CHINCHILLA_TOKENS_PER_PARAM = 20.0
# the printed loss is for a person reading the console (lossguard records every step itself): it is
# "sparse" only when it prints fewer than this many times and less often than every DENSE_LOGGING steps
MIN_LOGGED_POINTS = 10
DENSE_LOGGING = 10

INSTRUCTION_COLUMNS = frozenset(
    {
        "instruction", "prompt", "question", "query", "input", "output", "response", "answer",
        "completion", "messages", "conversations", "chosen", "rejected", "system", "context",
    }
)


def check_batch(args: Any, run: Run) -> list[PreflightRow]:
    per_device = positive_int(attr(args, "per_device_train_batch_size")) or run.micro_batch
    effective = run.micro_batch * run.grad_accum * run.world_size
    dp = f" x {run.micro_batch // per_device} GPUs (DataParallel)" if run.micro_batch != per_device else ""
    value = (f"{effective} sequences per optimizer step ({per_device} per device{dp} x "
             f"{run.grad_accum} accumulation x {run.world_size} process{'es' if run.world_size > 1 else ''})")
    rows = [PreflightRow("effective batch", value)]
    if run.rows is not None and run.rows < effective:
        rows[0].status = Status.WARN
        rows[0].advice = (f"the dataset has only {run.rows} rows, fewer than one optimizer step's "
                          f"{effective}: lower per_device_train_batch_size or gradient_accumulation_steps")
    return rows


def check_steps(run: Run, rollback_steps: int) -> list[PreflightRow]:
    if run.total_steps is None:
        return [PreflightRow("steps", "unknown (dataset without a length and max_steps unset)", Status.INFO)]
    if run.steps_per_epoch:
        epochs = f"{run.epochs:.3g}" if run.epochs is not None else "?"
        value = f"{run.steps_per_epoch} per epoch x {epochs} epochs = {run.total_steps} optimizer steps"
    else:
        value = f"{run.total_steps} optimizer steps (max_steps)"
    row = PreflightRow("steps", value)
    if rollback_steps and run.total_steps < 2 * rollback_steps:
        row.status = Status.INFO
        row.advice = (f"the run is shorter than twice the rollback distance ({rollback_steps} steps): "
                      f"recovery has little room; lower rollback_steps for short runs")
    return [row]


def check_logging(args: Any, run: Run, rollback_steps: int) -> list[PreflightRow]:
    strategy = enum_text(attr(args, "logging_strategy", "steps"))
    first = bool(attr(args, "logging_first_step", False))
    note = "lossguard records every step itself (events.jsonl), so its detection does not depend on this"
    if strategy == "no":
        return [PreflightRow("loss printed", "never (logging_strategy='no')", Status.INFO,
                             f"{note}; set logging_strategy='steps' to see the loss in the console")]
    if strategy == "epoch":
        n = math.ceil(run.epochs) if run.epochs else None
        value = f"once per epoch ({n} times)" if n else "once per epoch"
        return [PreflightRow("loss printed", value, Status.INFO,
                             f"{note}; set logging_strategy='steps' for a readable printed curve")]
    every = interval(attr(args, "logging_steps", 500), run.total_steps)
    if every is None:
        return [PreflightRow("loss printed", "unknown (logging_steps unreadable)", Status.INFO)]
    if run.total_steps is None:
        return [PreflightRow("loss printed", f"every {every} steps", Status.OK)]
    points = run.total_steps // every + (1 if first else 0)
    shown = ", ".join(str(every * k) for k in range(1, min(points, 3) + 1))
    value = f"every {every} steps (step {shown}, ...; {points} times over {run.total_steps} steps)"
    if points < MIN_LOGGED_POINTS and every > DENSE_LOGGING:
        target = max(1, min(DENSE_LOGGING, run.total_steps // MIN_LOGGED_POINTS))
        return [PreflightRow("loss printed", value, Status.INFO,
                             f"few points for reading the printed curve (< {MIN_LOGGED_POINTS}); {note}; "
                             f"logging_steps={target} would print it {run.total_steps // target} times")]
    return [PreflightRow("loss printed", value)]


def check_saving(args: Any, run: Run, rollback_steps: int) -> list[PreflightRow]:
    strategy = enum_text(attr(args, "save_strategy", "steps"))
    if strategy == "no":
        if not rollback_steps:  # recovery off: nothing about rollbacks
            return [PreflightRow("checkpoints", "none (save_strategy='no')", Status.WARN,
                                 "a crash loses the whole run; set save_strategy='steps'")]
        return [PreflightRow("checkpoints", "none (save_strategy='no')", Status.WARN,
                             f"lossguard rolls back from in-memory snapshots, but a crash loses the whole run "
                             f"and there is no pre-anomaly checkpoint to keep; set save_strategy='steps', "
                             f"save_steps={rollback_steps}")]
    if strategy == "epoch":
        every = run.steps_per_epoch
        label = f"every epoch ({every} steps)" if every else "every epoch"
    elif strategy == "best":
        return [PreflightRow("checkpoints", "only when the eval metric improves (save_strategy='best')",
                             Status.INFO, "lossguard's in-memory snapshots cover rollback; "
                             "periodic checkpoints protect against crashes")]
    else:
        every = interval(attr(args, "save_steps", 500), run.total_steps)
        label = f"every {every} steps" if every else "every ? steps"
    limit = positive_int(attr(args, "save_total_limit"))
    kept = f"keeps the newest {limit}" if limit else "keeps all"
    row = PreflightRow("checkpoints", f"{label}, {kept}")
    if every is None:
        return [row]
    problems: list[str] = []
    notes: list[str] = []
    if run.total_steps is not None and every > run.total_steps:
        problems.append(f"the first checkpoint (step {every}) comes after the last step ({run.total_steps}): "
                        f"set save_steps <= {run.total_steps}")
    elif rollback_steps and every > rollback_steps:
        # not a warning: rollbacks come from lossguard's in-memory snapshots; checkpoints only
        # matter after a crash, and then one more coarse step back costs little
        notes.append(f"checkpoints are further apart than the {rollback_steps}-step rollback distance; "
                     f"rollbacks use lossguard's in-memory snapshots, so this matters only for resuming "
                     f"after a crash")
    if limit and rollback_steps:
        needed = math.ceil(rollback_steps / every) + 1
        if limit < needed:
            problems.append(f"save_total_limit={limit} keeps checkpoints spanning {(limit - 1) * every} steps, "
                            f"less than the {rollback_steps}-step rollback distance, so rotation deletes the "
                            f"one a rollback from disk needs; set save_total_limit={needed} or more")
    if problems:
        row.status = Status.WARN
        row.advice = "; ".join(problems + notes)
    elif notes:
        row.status = Status.INFO
        row.advice = "; ".join(notes)
    return [row]


def check_params(counts: tuple[int, int] | None) -> list[PreflightRow]:
    if counts is None:
        return []
    total, trainable = counts
    share = 100.0 * trainable / total if total else 0.0
    row = PreflightRow("parameters", f"{human(total)} total, {human(trainable)} trainable ({share:.2f}%)")
    if trainable == 0:
        row.status = Status.WARN
        row.advice = ("nothing is trainable (every parameter has requires_grad=False): add a LoRA adapter "
                      "with peft.get_peft_model, or unfreeze the layers you mean to train")
    return [row]


def check_lora(model: Any, counts: tuple[int, int] | None) -> list[PreflightRow]:
    cfg = peft_config(model)
    if cfg is None:
        if counts and counts[0] and counts[1] == counts[0]:
            return [PreflightRow("adapter", "none: full fine-tuning of every parameter", Status.INFO,
                                 "LoRA (peft) trains far fewer parameters and keeps the base model intact")]
        return []
    peft_type = enum_text(attr(cfg, "peft_type", "peft")).upper()
    r = attr(cfg, "r")
    alpha = attr(cfg, "lora_alpha")
    targets = attr(cfg, "target_modules")
    if isinstance(targets, (set, frozenset, list, tuple)):
        targets_text = ", ".join(sorted(str(t) for t in targets))
    else:
        targets_text = str(targets) if targets else "peft defaults"
    parts = [peft_type]
    if r is not None:
        parts.append(f"r={r}")
    if alpha is not None:
        scale = f" (scale {float(alpha) / float(r):.3g})" if r else ""
        parts.append(f"alpha={alpha}{scale}")
    dropout = attr(cfg, "lora_dropout")
    if dropout is not None:
        parts.append(f"dropout={dropout}")
    parts.append(f"targets: {targets_text}")
    return [PreflightRow("adapter", ", ".join(parts))]


def check_tokens(audit: TokenAudit | None, counts: tuple[int, int] | None) -> list[PreflightRow]:
    if audit is None:
        return []
    if audit.rows_seen == 0:
        if audit.rows_total is not None and audit.rows_total == 0:
            return [PreflightRow("dataset tokens", "the training dataset is empty", Status.WARN,
                                 "pass a non-empty train_dataset")]
        return [PreflightRow("dataset tokens", "not audited (rows have no token ids: raw text or an unknown "
                             "format)", Status.INFO, "tokenize the dataset (input_ids, labels) to get token counts")]
    sample_note = (f"; estimated from {audit.rows_seen} sampled of {audit.rows_total} rows"
                   if audit.sampled else "")
    tokens = audit.scale(audit.tokens)
    has_labels = audit.rows_with_labels > 0
    supervised = audit.scale(audit.supervised) if has_labels else tokens
    value = f"{human(tokens)} tokens in {audit.rows_total if audit.rows_total is not None else audit.rows_seen} rows"
    if has_labels:
        value += f", {human(supervised)} supervised (labels != -100)"
    rows = [PreflightRow("dataset tokens", value + sample_note)]
    if counts is None or not counts[0]:
        return rows
    total_params = counts[0]
    needed = FINETUNE_TOKENS_PER_PARAM * total_params
    what = "supervised tokens" if has_labels else "tokens"
    verdict = PreflightRow("tokens vs parameters",
                           f"{human(supervised)} {what} vs 1e-5 x {human(total_params)} parameters = {human(needed)}")
    if supervised < needed:
        verdict.status = Status.WARN
        verdict.advice = (f"fewer {what} than ~1e-5 x parameters: fine-tuning will likely have little effect; "
                          f"add data (at least {human(needed)} {what}), or consider retrieval (RAG) instead")
    rows.append(verdict)
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * total_params
    rows.append(PreflightRow("pre-training reference",
                             f"Chinchilla's ~20 tokens/parameter would be {human(chinchilla)} tokens",
                             Status.INFO, "that is the budget for training from scratch, not a fine-tuning "
                             "requirement"))
    return rows


def _instruction_like(audit: TokenAudit, model: Any) -> bool:
    if audit.columns & INSTRUCTION_COLUMNS:
        return True
    name = model_name(model).lower()
    return any(word in name for word in ("instruct", "chat", "-it"))


def check_masking(audit: TokenAudit | None, model: Any) -> list[PreflightRow]:
    if audit is None or audit.rows_seen == 0:
        return []
    source = " after the data collator" if audit.collated else ""
    if audit.collator_error:
        source = f" (the collator failed on sampled rows: {audit.collator_error}; raw rows audited)"
    if audit.rows_with_labels == 0:
        return [PreflightRow("label masking", f"no labels in the rows{source}", Status.INFO,
                             "the collator will build them; DataCollatorForLanguageModeling copies input_ids, "
                             "so prompts stay unmasked: put labels with -100 on prompt tokens in the dataset")]
    share = 100.0 * audit.masked_positions / audit.label_positions if audit.label_positions else 0.0
    rows = [PreflightRow("label masking", f"{share:.1f}% of label positions are -100{source}")]
    seen = audit.rows_with_labels
    empty = audit.rows_nothing_to_learn
    empty_row = PreflightRow("rows with nothing to learn", f"{empty} of {seen} rows")
    if empty:
        empty_row.status = Status.WARN
        empty_row.value = f"{empty} of {seen} rows ({100.0 * empty / seen:.1f}%) have no supervised token"
        empty_row.advice = ("they add nothing to the loss, and a batch made only of them gives a NaN or 0 loss; "
                            "drop rows whose labels are all -100, or raise max_length if truncation cut the answer")
    rows.append(empty_row)
    unmasked = audit.rows_unmasked
    prompt_row = PreflightRow("prompt masking", f"{seen - unmasked} of {seen} rows mask part of the sequence")
    if unmasked:
        prompt_row.value = f"{unmasked} of {seen} rows have labels == input_ids everywhere (nothing masked)"
        advice = ("for instruction data set the prompt's labels to -100 so only the response is learned "
                  "(otherwise the model spends capacity predicting the prompt)")
        if unmasked == seen and _instruction_like(audit, model):
            prompt_row.status = Status.WARN
            prompt_row.advice = advice
        else:
            prompt_row.status = Status.INFO
            prompt_row.advice = advice + "; for plain-text (continued pre-training) data this is right"
    rows.append(prompt_row)
    return rows


def check_precision(args: Any, model: Any, gpu: tuple[bool, bool, str]) -> list[PreflightRow]:
    fp16 = bool(attr(args, "fp16", False))
    bf16 = bool(attr(args, "bf16", False))
    on_cpu = bool(attr(args, "use_cpu", False) or attr(args, "no_cuda", False))
    has_gpu, bf16_ok, gpu_name = gpu
    mode = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    if on_cpu or not has_gpu:
        value = f"{mode} on CPU"
        if fp16 or bf16:
            return [PreflightRow("mixed precision", value, Status.INFO,
                                 "no GPU: mixed precision brings no speed-up on CPU")]
        return [PreflightRow("mixed precision", value)]
    dtypes = trainable_dtypes(model) if model is not None else set()
    row = PreflightRow("mixed precision", f"{mode} on {gpu_name or 'GPU'}"
                       f"{' (bf16-capable)' if bf16_ok else ''}")
    if fp16 and "float16" in dtypes:
        row.status = Status.WARN
        row.advice = ("trainable parameters are float16, and fp16 AMP fails on them ('Attempting to unscale FP16 "
                      "gradients'); keep trainable weights in float32 (prepare_model_for_kbit_training does)")
    elif fp16 and bf16_ok:
        row.status = Status.WARN
        row.advice = ("this GPU supports bf16: set bf16=True, fp16=False (same speed, fp32's range, so no loss "
                      "scaling and no overflow spikes; use a bf16 compute dtype for 4-bit models too)")
    elif bf16 and not bf16_ok:
        row.status = Status.WARN
        row.advice = "this GPU has no bf16 support: set fp16=True, bf16=False"
    elif not fp16 and not bf16:
        row.status = Status.WARN
        row.advice = (f"training in full fp32 on a GPU is about twice as slow: set "
                      f"{'bf16' if bf16_ok else 'fp16'}=True")
    return [row]


def check_placement(model: Any, world_size: int) -> list[PreflightRow]:
    gpus, offload = device_map_gpus(model)
    if not gpus and not offload:
        return []
    value = f"device_map spans {len(gpus)} GPU{'s' if len(gpus) != 1 else ''}"
    if offload:
        value += f" and {' and '.join(offload)}"
    row = PreflightRow("device placement", value)
    launcher = os.environ.get("WORLD_SIZE") is not None or world_size > 1
    advice: list[str] = []
    if len(gpus) > 1 and not launcher:
        n = len(gpus)
        advice.append(
            f"device_map='auto' splits the layers over {n} GPUs (model parallelism), so only one GPU works at a "
            f"time; for data parallelism load the model with device_map={{'': local_rank}} (or no device_map) "
            f"and launch with `torchrun --nproc_per_node={n} train.py` or `accelerate launch train.py`; "
            f"if the model does not fit on one GPU, device_map='balanced' at least evens the split")
    if offload:
        advice.append("layers offloaded to CPU/disk make every step slow: use 4-bit loading or a larger GPU")
    if advice:
        row.status = Status.WARN
        row.advice = "; ".join(advice)
    return [row]

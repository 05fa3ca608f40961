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

import enum
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lossguard.numbers import as_float

logger = logging.getLogger("lossguard")

IGNORE_INDEX = -100
FINETUNE_TOKENS_PER_PARAM = 1e-5
CHINCHILLA_TOKENS_PER_PARAM = 20.0
MIN_LOGGED_POINTS = 50
COLLATE_BATCH = 128  # rows per collator call: fewer, larger batches audit the same rows ~30% faster than 16

INSTRUCTION_COLUMNS = frozenset(
    {
        "instruction", "prompt", "question", "query", "input", "output", "response", "answer",
        "completion", "messages", "conversations", "chosen", "rejected", "system", "context",
    }
)


class Status(str, enum.Enum):
    """How a preflight row reads: fine, worth knowing, or worth changing before training."""

    OK = "ok"
    INFO = "info"
    WARN = "warn"


@dataclass
class PreflightRow:
    """One line of the preflight table; ``advice`` says what to change when ``status`` is warn."""

    name: str
    value: str
    status: Status = Status.OK
    advice: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "value": self.value, "status": self.status.value, "advice": self.advice}


@dataclass
class PreflightReport:
    """The preflight rows plus the numbers behind them (``facts``, for telemetry and tests)."""

    rows: list[PreflightRow] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        """One sentence per warn row: what is wrong and what to change."""
        return [f"{r.name}: {r.value}; {r.advice}" if r.advice else f"{r.name}: {r.value}"
                for r in self.rows if r.status is Status.WARN]

    def row(self, name: str) -> PreflightRow | None:
        """The row called ``name``, if that check ran."""
        return next((r for r in self.rows if r.name == name), None)

    def to_record(self) -> dict[str, Any]:
        """The telemetry record (kind ``preflight``)."""
        return {
            "kind": "preflight",
            "rows": [r.to_dict() for r in self.rows],
            "warnings": self.warnings,
            "facts": dict(self.facts),
        }


# ---------------------------------------------------------------- small readers

def _get(obj: Any, name: str, default: Any = None) -> Any:
    try:
        value = getattr(obj, name, default)
    except Exception:  # properties of TrainingArguments may set up devices and fail
        return default
    return default if value is None else value


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value)).lower()


def _positive_int(value: Any) -> int | None:
    f = as_float(value, finite=True)
    return int(f) if f is not None and f > 0 else None


def _human(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}" if not float(n).is_integer() else str(int(n))


def _interval(value: Any, total_steps: int | None) -> int | None:
    """A ``logging_steps``/``save_steps`` value in steps (values below 1 are a share of the run)."""
    f = as_float(value, finite=True)
    if f is None or f <= 0:
        return None
    if f < 1:
        return max(1, math.ceil(f * total_steps)) if total_steps else None
    return int(f)


# ---------------------------------------------------------------- facts about the run

@dataclass
class _Run:
    world_size: int
    micro_batch: int
    grad_accum: int
    rows: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    epochs: float | None


def _world_size(args: Any, world_size: int | None) -> int:
    if world_size is not None and world_size >= 1:
        return int(world_size)
    ws = _positive_int(_get(args, "world_size"))
    if ws:
        return ws
    return _positive_int(os.environ.get("WORLD_SIZE")) or 1


def _dataset_len(dataset: Any) -> int | None:
    if dataset is None:
        return None
    try:
        return len(dataset)
    except Exception:
        return None


def _run_facts(args: Any, world_size: int, n_rows: int | None, model_parallel: bool) -> _Run:
    per_device = _positive_int(_get(args, "per_device_train_batch_size")) or 8
    n_gpu = 1
    if world_size == 1 and not model_parallel:
        n_gpu = _positive_int(_get(args, "n_gpu")) or 1
    micro = per_device * max(1, n_gpu)  # the Trainer wraps several visible GPUs in DataParallel
    grad_accum = _positive_int(_get(args, "gradient_accumulation_steps")) or 1
    steps_per_epoch = None
    if n_rows:
        per_rank = math.ceil(n_rows / world_size)
        drop_last = bool(_get(args, "dataloader_drop_last", False))
        batches = per_rank // micro if drop_last else math.ceil(per_rank / micro)
        steps_per_epoch = max(math.ceil(batches / grad_accum), 1)
    max_steps = _positive_int(_get(args, "max_steps"))
    try:
        epochs: float | None = float(_get(args, "num_train_epochs", 3.0))
    except (TypeError, ValueError):
        epochs = None
    if max_steps:
        total = max_steps
        epochs = total / steps_per_epoch if steps_per_epoch else None
    elif steps_per_epoch and epochs:
        total = math.ceil(epochs * steps_per_epoch)
    else:
        total = None
    return _Run(world_size, micro, grad_accum, n_rows, steps_per_epoch, total, epochs)


# ---------------------------------------------------------------- model facts

def _count_params(model: Any) -> tuple[int, int] | None:
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


def _peft_config(model: Any) -> Any:
    configs = _get(model, "peft_config")
    if not isinstance(configs, dict) or not configs:
        return None
    active = _get(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0] if active else None
    if isinstance(active, str) and active in configs:
        return configs[active]
    return next(iter(configs.values()))


def _model_name(model: Any) -> str:
    config = _get(model, "config")
    return str(_get(config, "_name_or_path", "") or _get(config, "name_or_path", "") or "")


def _device_map_gpus(model: Any) -> tuple[list[str], list[str]]:
    device_map = _get(model, "hf_device_map")
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


# ---------------------------------------------------------------- dataset audit

@dataclass
class _TokenAudit:
    rows_total: int | None
    rows_seen: int = 0
    sampled: bool = False
    tokens: int = 0
    label_positions: int = 0
    masked_positions: int = 0
    supervised: int = 0
    rows_with_labels: int = 0
    rows_nothing_to_learn: int = 0
    rows_unmasked: int = 0
    columns: set[str] = field(default_factory=set)
    collated: bool = False
    collator_error: str = ""

    def scale(self, value: int) -> float:
        if self.rows_total and self.rows_seen:
            return value * self.rows_total / self.rows_seen
        return float(value)


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return None


def _flat_ints(value: Any) -> list[int] | None:
    seq = _as_list(value)
    if seq is None or any(isinstance(x, (list, tuple)) for x in seq):
        return None
    try:
        return [int(x) for x in seq]
    except (TypeError, ValueError):
        return None


def _unwrap_loader(dataset: Any, collator: Any) -> tuple[Any, Any]:
    inner = getattr(dataset, "dataset", None)
    if inner is not None and hasattr(dataset, "collate_fn") and hasattr(dataset, "batch_size"):
        return inner, collator if collator is not None else getattr(dataset, "collate_fn", None)
    return dataset, collator


def _sample_rows(dataset: Any, limit: int) -> tuple[list[Any], int | None, bool]:
    n = _dataset_len(dataset)
    if n is None or not hasattr(dataset, "__getitem__"):
        return [], n, False
    if n <= limit:
        indices: Sequence[int] = range(n)
        sampled = False
    else:
        indices = sorted(random.Random(0).sample(range(n), limit))
        sampled = True
    rows = []
    for i in indices:
        try:
            rows.append(dataset[i])
        except Exception:
            continue
    return rows, n, sampled


def _column_names(dataset: Any, rows: list[Any]) -> set[str]:
    names = _get(dataset, "column_names")
    if isinstance(names, (list, tuple)):
        return {str(c) for c in names}
    out: set[str] = set()
    for r in rows[:50]:
        if isinstance(r, dict):
            out.update(str(k) for k in r)
    return out


def _collate(rows: list[Any], collator: Callable[[list[Any]], Any]) -> list[Any]:
    """The sampled rows as the collator batches them (``COLLATE_BATCH`` rows a batch)."""
    out: list[Any] = []
    for start in range(0, len(rows), COLLATE_BATCH):
        batch = collator(rows[start:start + COLLATE_BATCH])
        if "input_ids" not in batch or _as_list(batch["input_ids"]) is None:
            raise ValueError("the collator returned no input_ids")
        out.append(batch)
    return out


def _matrix(value: Any) -> np.ndarray | None:
    """A collated column as a 2-d integer array; None when missing, ragged or not integers."""
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged lists
        return None
    if arr.ndim != 2 or arr.dtype.kind not in "iub":
        return None
    return arr.astype(np.int64, copy=False)


def _batch_rows(batch: Any) -> list[dict[str, Any]]:
    """A collated batch split into per-row dicts, for batches ``_audit_batch`` cannot take whole."""
    ids = _as_list(batch["input_ids"]) or []
    labels = _as_list(batch.get("labels"))
    mask = _as_list(batch.get("attention_mask"))
    out: list[dict[str, Any]] = []
    for i, row_ids in enumerate(ids):
        row: dict[str, Any] = {"input_ids": row_ids}
        if labels is not None and i < len(labels):
            row["labels"] = labels[i]
        if mask is not None and i < len(mask):
            row["attention_mask"] = mask[i]
        out.append(row)
    return out


def _audit_batch(batch: Any, audit: _TokenAudit, shift: bool, pad_id: int | None) -> bool:
    """``_audit_row`` over every row of a rectangular collated batch at once (the same counts);
    False, having counted nothing, when the batch is not rectangular integer arrays."""
    ids = _matrix(batch["input_ids"])
    raw_mask, raw_labels = batch.get("attention_mask"), batch.get("labels")
    mask, labels = _matrix(raw_mask), _matrix(raw_labels)
    if ids is None or (raw_mask is not None and mask is None) or (raw_labels is not None and labels is None):
        return False
    if labels is not None and len(labels) != len(ids) or mask is not None and len(mask) != len(ids):
        return False
    if mask is not None and mask.shape == ids.shape:
        real = mask != 0
    elif labels is not None and pad_id is not None and labels.shape == ids.shape:
        real = ~((ids == pad_id) & (labels == IGNORE_INDEX))
    else:
        real = np.ones(ids.shape, dtype=bool)
    tokens = int(real.sum())
    if labels is None:
        audit.rows_seen += len(ids)
        audit.tokens += tokens
        return True
    if labels.shape == ids.shape:
        kept = real
        unmasked = int((real.any(axis=1) & ((labels == ids) | ~real).all(axis=1)).sum())
    else:  # encoder-decoder labels have their own length
        kept = np.ones(labels.shape, dtype=bool)
        unmasked = 0
    learned = kept & (labels != IGNORE_INDEX)
    n_supervised = learned.sum(axis=1)
    if shift and labels.shape[1]:  # a causal LM never predicts the first kept position
        first = np.argmax(kept, axis=1)
        n_supervised = n_supervised - (kept.any(axis=1) & learned[np.arange(len(labels)), first])
    # counted only now, so a batch that fails above is audited row by row without double counts
    audit.rows_seen += len(ids)
    audit.tokens += tokens
    audit.rows_with_labels += len(ids)
    audit.rows_unmasked += unmasked
    audit.label_positions += int(kept.sum())
    audit.masked_positions += int((kept & (labels == IGNORE_INDEX)).sum())
    audit.supervised += int(n_supervised.sum())
    audit.rows_nothing_to_learn += int((n_supervised == 0).sum())
    return True


def _audit_row(row: Any, audit: _TokenAudit, shift: bool, pad_id: int | None) -> None:
    if not isinstance(row, dict) and not hasattr(row, "keys"):
        return
    ids = _flat_ints(row.get("input_ids"))
    if ids is None:
        return
    mask = _flat_ints(row.get("attention_mask"))
    labels = _flat_ints(row.get("labels"))
    if mask is not None and len(mask) == len(ids):
        real = [m != 0 for m in mask]
    elif labels is not None and pad_id is not None and len(labels) == len(ids):
        real = [not (t == pad_id and lab == IGNORE_INDEX) for t, lab in zip(ids, labels, strict=True)]
    else:
        real = [True] * len(ids)
    audit.rows_seen += 1
    audit.tokens += sum(real)
    if labels is None:
        return
    audit.rows_with_labels += 1
    if len(labels) == len(ids):
        kept = [lab for lab, keep in zip(labels, real, strict=True) if keep]
        kept_ids = [t for t, keep in zip(ids, real, strict=True) if keep]
    else:  # encoder-decoder labels have their own length
        kept, kept_ids = labels, []
    audit.label_positions += len(kept)
    audit.masked_positions += sum(1 for lab in kept if lab == IGNORE_INDEX)
    learned = kept[1:] if shift else kept  # a causal LM never predicts the first position
    n_supervised = sum(1 for lab in learned if lab != IGNORE_INDEX)
    audit.supervised += n_supervised
    if n_supervised == 0:
        audit.rows_nothing_to_learn += 1
    if kept_ids and kept == kept_ids:
        audit.rows_unmasked += 1


def _audit_dataset(dataset: Any, collator: Any, limit: int, shift: bool, pad_id: int | None) -> _TokenAudit | None:
    rows, n, sampled = _sample_rows(dataset, max(1, limit))
    audit = _TokenAudit(rows_total=n, sampled=sampled)
    if not rows:
        return audit if n is not None else None
    audit.columns = _column_names(dataset, rows)
    audit_rows: list[Any] = rows
    if collator is not None:
        try:
            batches = _collate(rows, collator)
            audit.collated = True
        except Exception as err:  # a collator that tokenizes or needs a trainer: audit the raw rows
            audit.collator_error = f"{type(err).__name__}: {err}"[:160]
        else:
            audit_rows = []
            for batch in batches:
                try:
                    whole = _audit_batch(batch, audit, shift, pad_id)
                except Exception:
                    whole = False
                if not whole:
                    audit_rows.extend(_batch_rows(batch))
    for row in audit_rows:
        try:
            _audit_row(row, audit, shift, pad_id)
        except Exception:
            continue
    return audit


# ---------------------------------------------------------------- the checks

def _check_batch(args: Any, run: _Run) -> list[PreflightRow]:
    per_device = _positive_int(_get(args, "per_device_train_batch_size")) or run.micro_batch
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


def _check_steps(run: _Run, rollback_steps: int) -> list[PreflightRow]:
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


def _check_logging(args: Any, run: _Run, rollback_steps: int) -> list[PreflightRow]:
    strategy = _enum_value(_get(args, "logging_strategy", "steps"))
    first = bool(_get(args, "logging_first_step", False))
    note = "lossguard records every step itself (events.jsonl), so its detection does not depend on this"
    if strategy == "no":
        return [PreflightRow("loss printed", "never (logging_strategy='no')", Status.INFO,
                             f"{note}; set logging_strategy='steps' to see the loss in the console")]
    if strategy == "epoch":
        n = math.ceil(run.epochs) if run.epochs else None
        value = f"once per epoch ({n} times)" if n else "once per epoch"
        return [PreflightRow("loss printed", value, Status.INFO,
                             f"{note}; set logging_strategy='steps' for a readable printed curve")]
    every = _interval(_get(args, "logging_steps", 500), run.total_steps)
    if every is None:
        return [PreflightRow("loss printed", "unknown (logging_steps unreadable)", Status.INFO)]
    if run.total_steps is None:
        return [PreflightRow("loss printed", f"every {every} steps", Status.OK)]
    points = run.total_steps // every + (1 if first else 0)
    shown = ", ".join(str(every * k) for k in range(1, min(points, 3) + 1))
    value = f"every {every} steps (step {shown}, ...; {points} times over {run.total_steps} steps)"
    if points < MIN_LOGGED_POINTS or (rollback_steps and every > rollback_steps):
        target = max(1, min(run.total_steps // MIN_LOGGED_POINTS, rollback_steps or every))
        return [PreflightRow("loss printed", value, Status.INFO,
                             f"sparse for reading a curve (< {MIN_LOGGED_POINTS} points or coarser than the "
                             f"{rollback_steps}-step rollback distance); {note}; logging_steps={target} "
                             f"would print it {run.total_steps // target} times")]
    return [PreflightRow("loss printed", value)]


def _check_saving(args: Any, run: _Run, rollback_steps: int) -> list[PreflightRow]:
    strategy = _enum_value(_get(args, "save_strategy", "steps"))
    if strategy == "no":
        return [PreflightRow("checkpoints", "none (save_strategy='no')", Status.WARN,
                             f"lossguard rolls back from in-memory snapshots, but a crash loses the whole run "
                             f"and there is no pre-anomaly checkpoint to keep; set save_strategy='steps', "
                             f"save_steps={rollback_steps or 100}")]
    if strategy == "epoch":
        every = run.steps_per_epoch
        label = f"every epoch ({every} steps)" if every else "every epoch"
    elif strategy == "best":
        return [PreflightRow("checkpoints", "only when the eval metric improves (save_strategy='best')",
                             Status.INFO, "lossguard's in-memory snapshots cover rollback; "
                             "periodic checkpoints protect against crashes")]
    else:
        every = _interval(_get(args, "save_steps", 500), run.total_steps)
        label = f"every {every} steps" if every else "every ? steps"
    limit = _positive_int(_get(args, "save_total_limit"))
    kept = f"keeps the newest {limit}" if limit else "keeps all"
    row = PreflightRow("checkpoints", f"{label}, {kept}")
    if every is None:
        return [row]
    problems: list[str] = []
    if run.total_steps is not None and every > run.total_steps:
        problems.append(f"the first checkpoint (step {every}) comes after the last step ({run.total_steps}): "
                        f"set save_steps <= {run.total_steps}")
    if rollback_steps and every > rollback_steps:
        problems.append(f"save_steps={every} is more than the rollback distance ({rollback_steps}): the newest "
                        f"checkpoint at least {rollback_steps} steps before trouble may be up to "
                        f"{every + rollback_steps} steps old; set save_steps={rollback_steps} "
                        f"(lossguard's in-memory snapshots still roll back {rollback_steps} steps)")
    if limit and rollback_steps:
        needed = math.ceil(rollback_steps / every) + 1
        if limit < needed:
            problems.append(f"save_total_limit={limit} keeps checkpoints spanning {(limit - 1) * every} steps, "
                            f"less than the {rollback_steps}-step rollback distance, so rotation deletes the "
                            f"one a rollback from disk needs; set save_total_limit={needed} or more")
    if problems:
        row.status = Status.WARN
        row.advice = "; ".join(problems)
    return [row]


def _check_params(counts: tuple[int, int] | None) -> list[PreflightRow]:
    if counts is None:
        return []
    total, trainable = counts
    share = 100.0 * trainable / total if total else 0.0
    row = PreflightRow("parameters", f"{_human(total)} total, {_human(trainable)} trainable ({share:.2f}%)")
    if trainable == 0:
        row.status = Status.WARN
        row.advice = ("nothing is trainable (every parameter has requires_grad=False): add a LoRA adapter "
                      "with peft.get_peft_model, or unfreeze the layers you mean to train")
    return [row]


def _check_lora(model: Any, counts: tuple[int, int] | None) -> list[PreflightRow]:
    cfg = _peft_config(model)
    if cfg is None:
        if counts and counts[0] and counts[1] == counts[0]:
            return [PreflightRow("adapter", "none: full fine-tuning of every parameter", Status.INFO,
                                 "LoRA (peft) trains far fewer parameters and keeps the base model intact")]
        return []
    peft_type = _enum_value(_get(cfg, "peft_type", "peft")).upper()
    r = _get(cfg, "r")
    alpha = _get(cfg, "lora_alpha")
    targets = _get(cfg, "target_modules")
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
    dropout = _get(cfg, "lora_dropout")
    if dropout is not None:
        parts.append(f"dropout={dropout}")
    parts.append(f"targets: {targets_text}")
    return [PreflightRow("adapter", ", ".join(parts))]


def _check_tokens(audit: _TokenAudit | None, counts: tuple[int, int] | None) -> list[PreflightRow]:
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
    value = f"{_human(tokens)} tokens in {audit.rows_total if audit.rows_total is not None else audit.rows_seen} rows"
    if has_labels:
        value += f", {_human(supervised)} supervised (labels != -100)"
    rows = [PreflightRow("dataset tokens", value + sample_note)]
    if counts is None or not counts[0]:
        return rows
    total_params = counts[0]
    needed = FINETUNE_TOKENS_PER_PARAM * total_params
    what = "supervised tokens" if has_labels else "tokens"
    verdict = PreflightRow("tokens vs parameters",
                           f"{_human(supervised)} {what} vs 1e-5 x {_human(total_params)} parameters = {_human(needed)}")
    if supervised < needed:
        verdict.status = Status.WARN
        verdict.advice = (f"fewer {what} than ~1e-5 x parameters: fine-tuning will likely have little effect; "
                          f"add data (at least {_human(needed)} {what}), or consider retrieval (RAG) instead")
    rows.append(verdict)
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * total_params
    rows.append(PreflightRow("pre-training reference",
                             f"Chinchilla's ~20 tokens/parameter would be {_human(chinchilla)} tokens",
                             Status.INFO, "that is the budget for training from scratch, not a fine-tuning "
                             "requirement"))
    return rows


def _instruction_like(audit: _TokenAudit, model: Any) -> bool:
    if audit.columns & INSTRUCTION_COLUMNS:
        return True
    name = _model_name(model).lower()
    return any(word in name for word in ("instruct", "chat", "-it"))


def _check_masking(audit: _TokenAudit | None, model: Any) -> list[PreflightRow]:
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


def _gpu_info() -> tuple[bool, bool, str]:
    try:
        import torch

        if not torch.cuda.is_available():
            return False, False, ""
        return True, bool(torch.cuda.is_bf16_supported()), str(torch.cuda.get_device_name(0))
    except Exception:
        return False, False, ""


def _trainable_dtypes(model: Any) -> set[str]:
    params = getattr(model, "parameters", None)
    if not callable(params):
        return set()
    return {str(p.dtype).replace("torch.", "") for p in params() if getattr(p, "requires_grad", False)}


def _check_precision(args: Any, model: Any, gpu: tuple[bool, bool, str]) -> list[PreflightRow]:
    fp16 = bool(_get(args, "fp16", False))
    bf16 = bool(_get(args, "bf16", False))
    on_cpu = bool(_get(args, "use_cpu", False) or _get(args, "no_cuda", False))
    has_gpu, bf16_ok, gpu_name = gpu
    mode = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    if on_cpu or not has_gpu:
        value = f"{mode} on CPU"
        if fp16 or bf16:
            return [PreflightRow("mixed precision", value, Status.INFO,
                                 "no GPU: mixed precision brings no speed-up on CPU")]
        return [PreflightRow("mixed precision", value)]
    dtypes = _trainable_dtypes(model) if model is not None else set()
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


def _check_placement(model: Any, world_size: int) -> list[PreflightRow]:
    gpus, offload = _device_map_gpus(model)
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


# ---------------------------------------------------------------- entry point

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
) -> PreflightReport:
    """Check a fine-tuning set-up before training and say what to change.

    Args:
        args: the ``TrainingArguments`` (or any object with the same attribute names).
        model: the model as it will be trained (a peft model, a 4-bit model, a plain module).
        train_dataset: a list of dicts, a torch ``Dataset``, a Hugging Face ``datasets.Dataset``
            or a ``DataLoader`` (its dataset and collate_fn are used); rows with ``input_ids``
            and, ideally, ``labels``. At most ``sample_limit`` rows are read (the report says so).
        world_size: number of training processes; defaults to ``args.world_size`` / ``WORLD_SIZE``.
        rollback_steps: lossguard's rollback distance, to judge logging and checkpoint cadence.
        data_collator: applied to the sampled rows so the audit sees labels as the model will
            (``DataCollatorForLanguageModeling`` replaces the dataset's labels, for example).
        sample_limit: the most dataset rows to read.

    Returns:
        A ``PreflightReport``; ``report.warnings`` lists what to change, one sentence each.
    """
    rows: list[PreflightRow] = []
    facts: dict[str, Any] = {}
    gpus, _ = _device_map_gpus(model)
    ws = _world_size(args, world_size)
    dataset, collator = _unwrap_loader(train_dataset, data_collator)
    run = _run_facts(args, ws, _dataset_len(dataset), model_parallel=len(gpus) > 1)
    counts: tuple[int, int] | None = None
    try:
        counts = _count_params(model)
    except Exception as err:
        logger.debug("lossguard: preflight could not count parameters (%s)", err)
    config = _get(model, "config")
    shift = not bool(_get(config, "is_encoder_decoder", False))
    pad_id = _get(config, "pad_token_id")
    audit: _TokenAudit | None = None
    try:
        audit = _audit_dataset(dataset, collator, sample_limit, shift, pad_id if isinstance(pad_id, int) else None)
    except Exception as err:
        logger.debug("lossguard: preflight could not audit the dataset (%s)", err)

    _safe(rows, lambda: _check_batch(args, run), "batch")
    _safe(rows, lambda: _check_steps(run, rollback_steps), "steps")
    _safe(rows, lambda: _check_logging(args, run, rollback_steps), "logging")
    _safe(rows, lambda: _check_saving(args, run, rollback_steps), "saving")
    _safe(rows, lambda: _check_params(counts), "params")
    _safe(rows, lambda: _check_lora(model, counts), "lora")
    _safe(rows, lambda: _check_tokens(audit, counts), "tokens")
    _safe(rows, lambda: _check_masking(audit, model), "masking")
    _safe(rows, lambda: _check_precision(args, model, _gpu_info()), "precision")
    _safe(rows, lambda: _check_placement(model, ws), "placement")

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

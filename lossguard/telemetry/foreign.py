"""Readers for logs that other tools write, yielding the same ``Sample`` records as ours.

- Hugging Face Trainer: ``checkpoint-*/trainer_state.json`` (``log_history``; ``NaN`` and
  ``Infinity`` literals; eval entries; old versions without ``grad_norm``).
- LLaMA-Factory: ``trainer_log.jsonl`` (``current_steps``, ``loss``, ``lr``).
- PyTorch Lightning CSVLogger: ``metrics.csv``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from lossguard.errors import LogReadError
from lossguard.records import Sample, as_step
from lossguard.telemetry.reader import _open_error, iter_events
from lossguard.telemetry.runlog import RunLog
from lossguard.telemetry.schema import as_float


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise _open_error(path, err) from None
    except UnicodeDecodeError:
        raise LogReadError(f"{path}: not a text file (binary content)") from None
    if not text.strip():
        raise LogReadError(f"{path}: empty file")
    try:
        return json.loads(text)  # accepts NaN / Infinity literals, as the Trainer writes them
    except json.JSONDecodeError as err:
        body = text.rstrip()
        cut_short = not body.endswith(("}", "]")) and err.pos >= len(body) - 32
        what = "truncated" if cut_short else "corrupt"
        raise LogReadError(
            f"{path}: {what} JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None


def read_trainer_state(path: str | os.PathLike[str]) -> RunLog:
    """Samples and eval entries from a Trainer ``trainer_state.json``."""
    p = Path(path)
    state = _load_json(p)
    if not isinstance(state, dict) or not isinstance(state.get("log_history", []), list):
        raise LogReadError(f"{p}: not a trainer_state.json (no log_history list)")
    log = RunLog(source="trainer_state", path=p)
    log.max_steps = as_step(state.get("max_steps")) or None
    log.num_train_epochs = as_float(state.get("num_train_epochs"))
    global_step = as_step(state.get("global_step"))
    log.ended = bool(log.max_steps and global_step is not None and global_step >= log.max_steps)
    for entry in state.get("log_history", []):
        if not isinstance(entry, dict):
            continue
        step = as_step(entry.get("step"))
        if step is None:
            continue
        log.metric_keys.update(entry)
        if "loss" in entry:
            log.add_sample(
                Sample(
                    step=step,
                    loss=as_float(entry.get("loss")),
                    grad_norm=as_float(entry.get("grad_norm")),
                    lr=as_float(entry.get("learning_rate", entry.get("lr"))),
                    epoch=as_float(entry.get("epoch")),
                )
            )
        elif any(k.startswith("eval_") for k in entry):
            log.evals.append({"kind": "eval", **entry})
    return log


def read_llamafactory(path: str | os.PathLike[str]) -> RunLog:
    """Samples from LLaMA-Factory's ``trainer_log.jsonl`` (duplicated steps: the last wins)."""
    p = Path(path)
    log = RunLog(source="llamafactory", path=p)
    for entry in iter_events(p):
        step = as_step(entry.get("current_steps"))
        total = as_step(entry.get("total_steps"))
        log.metric_keys.update(entry)
        if total:
            log.max_steps = total
        if step is None:
            continue
        log.ended = bool(log.max_steps and step >= log.max_steps)
        if entry.get("loss") is not None:
            log.add_sample(
                Sample(
                    step=step,
                    loss=as_float(entry.get("loss")),
                    grad_norm=as_float(entry.get("grad_norm")),
                    lr=as_float(entry.get("lr", entry.get("learning_rate"))),
                    epoch=as_float(entry.get("epoch")),
                )
            )
        elif entry.get("eval_loss") is not None:
            log.evals.append({"kind": "eval", "step": step, "eval_loss": entry.get("eval_loss")})
    return log


# In order of preference. "train/loss" is what `self.log("train/loss")` writes (RL4CO, many
# research repos); "train_loss_epoch" alone is a run that logs the training loss once per epoch.
_LOSS_COLUMNS = ("train_loss_step", "train_loss", "loss", "train/loss_step", "train/loss", "train_loss_epoch")
_VAL_COLUMNS = ("val_loss", "val/loss")


def read_lightning_csv(path: str | os.PathLike[str]) -> RunLog:
    """Samples from a Lightning CSVLogger ``metrics.csv`` (rows without a train loss skipped)."""
    p = Path(path)
    try:
        fh = open(p, newline="", encoding="utf-8")
    except OSError as err:
        raise _open_error(p, err) from None
    log = RunLog(source="lightning", path=p)
    try:
        with fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            loss_col = next((c for c in _LOSS_COLUMNS if c in columns), None)
            if "step" not in columns or loss_col is None:
                raise LogReadError(
                    f"{p}: not a Lightning metrics.csv (needs a 'step' column and one of "
                    f"{', '.join(_LOSS_COLUMNS)}; found {', '.join(columns) or 'no header'})"
                )
            lr_col = next((c for c in columns if c == "lr" or c.startswith("lr-")), None)
            val_col = next((c for c in _VAL_COLUMNS if c in columns), None)
            gn_col = next((c for c in columns if "grad" in c and "norm" in c), None)
            log.metric_keys.update(columns)
            for row in reader:
                step = as_step(row.get("step"))
                loss = row.get(loss_col)
                if step is None or loss in (None, ""):
                    if step is not None and val_col and row.get(val_col) not in (None, ""):
                        log.evals.append({"kind": "eval", "step": step, "eval_loss": as_float(row[val_col])})
                    continue
                log.add_sample(
                    Sample(
                        step=step,
                        loss=as_float(loss),
                        grad_norm=as_float(row.get(gn_col)) if gn_col else None,
                        lr=as_float(row.get(lr_col)) if lr_col else None,
                        epoch=as_float(row.get("epoch")),
                    )
                )
    except (UnicodeDecodeError, csv.Error) as err:
        raise LogReadError(f"{p}: unreadable CSV ({err})") from None
    return log

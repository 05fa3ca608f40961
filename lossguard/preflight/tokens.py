"""The token audit: tokens, supervised tokens and label masking in a sample of the training rows."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lossguard.preflight.readers import attr, dataset_len

IGNORE_INDEX = -100
COLLATE_BATCH = 128  # rows per collator call: fewer, larger calls audit the same rows faster


@dataclass
class TokenAudit:
    """Counts over the audited rows; ``scale`` extrapolates a count from the sample to the dataset."""

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


def _flat_array(value: Any) -> np.ndarray | None:
    """A row's column as a 1-d integer array; None when missing, nested or not integers."""
    seq = _as_list(value)
    if seq is None:
        return None
    try:
        arr = np.asarray(seq, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        return None
    return arr if arr.ndim == 1 else None


def unwrap_loader(dataset: Any, collator: Any) -> tuple[Any, Any]:
    inner = getattr(dataset, "dataset", None)
    if inner is not None and hasattr(dataset, "collate_fn") and hasattr(dataset, "batch_size"):
        return inner, collator if collator is not None else getattr(dataset, "collate_fn", None)
    return dataset, collator


def _sample_rows(dataset: Any, limit: int) -> tuple[list[Any], int | None, bool]:
    n = dataset_len(dataset)
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
    names = attr(dataset, "column_names")
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


def batch_rows(batch: Any) -> list[dict[str, Any]]:
    """A collated batch split into per-row dicts, for batches ``audit_batch`` cannot take whole."""
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


def audit_batch(batch: Any, audit: TokenAudit, shift: bool, pad_id: int | None) -> bool:
    """Count a rectangular collated batch into ``audit``; False, having counted nothing, when the
    batch is not rectangular integer arrays (``batch_rows`` then splits it for ``audit_row``)."""
    ids = _matrix(batch["input_ids"])
    raw_mask, raw_labels = batch.get("attention_mask"), batch.get("labels")
    mask, labels = _matrix(raw_mask), _matrix(raw_labels)
    if ids is None or (raw_mask is not None and mask is None) or (raw_labels is not None and labels is None):
        return False
    if labels is not None and len(labels) != len(ids) or mask is not None and len(mask) != len(ids):
        return False
    _count(audit, ids, mask, labels, shift, pad_id)
    return True


def audit_row(row: Any, audit: TokenAudit, shift: bool, pad_id: int | None) -> None:
    """Count one row (a dict of flat integer lists) into ``audit``; anything else is skipped."""
    if not isinstance(row, dict) and not hasattr(row, "keys"):
        return
    ids = _flat_array(row.get("input_ids"))
    if ids is None:
        return
    mask = _flat_array(row.get("attention_mask"))
    labels = _flat_array(row.get("labels"))
    _count(audit, ids[None], None if mask is None else mask[None], None if labels is None else labels[None],
           shift, pad_id)


def _count(
    audit: TokenAudit, ids: np.ndarray, mask: np.ndarray | None, labels: np.ndarray | None, shift: bool,
    pad_id: int | None,
) -> None:
    """Add the counts of rows ``ids`` (2-d) with their mask and labels (same number of rows) to ``audit``."""
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
        return
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
    # counted only now, so rows that fail above are not counted in part
    audit.rows_seen += len(ids)
    audit.tokens += tokens
    audit.rows_with_labels += len(ids)
    audit.rows_unmasked += unmasked
    audit.label_positions += int(kept.sum())
    audit.masked_positions += int((kept & (labels == IGNORE_INDEX)).sum())
    audit.supervised += int(n_supervised.sum())
    audit.rows_nothing_to_learn += int((n_supervised == 0).sum())


def audit_dataset(dataset: Any, collator: Any, limit: int, shift: bool, pad_id: int | None) -> TokenAudit | None:
    rows, n, sampled = _sample_rows(dataset, max(1, limit))
    audit = TokenAudit(rows_total=n, sampled=sampled)
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
                    whole = audit_batch(batch, audit, shift, pad_id)
                except Exception:
                    whole = False
                if not whole:
                    audit_rows.extend(batch_rows(batch))
    for row in audit_rows:
        try:
            audit_row(row, audit, shift, pad_id)
        except Exception:
            continue
    return audit

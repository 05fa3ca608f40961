"""The no-learning levels of a live run (``signals/references.py``), read from the model, the
first rows of the training set and the trainer's class.

- uniform: ln of the model's vocabulary (a causal or seq2seq LM) or of its label count (a
  sequence classifier);
- unigram: the entropy of the label tokens of the first rows (positions with ``-100`` left
  out; a causal LM never predicts its first position), what a model ignoring its inputs reaches;
- objective: preference and RL trainers (TRL's DPO, KTO, ORPO, GRPO, PPO, reward models) by class.

Nothing here may disturb training: rows are read by index (not through the training data
loader) and collated with every random generator's state put back afterwards. Each part that
cannot be read is left unknown; the result says where each value came from.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from lossguard.signals.references import Objective, References, entropy, objective_from_trainer, uniform_level

logger = logging.getLogger("lossguard")

IGNORE_INDEX = -100
ROWS = 512  # rows read for the unigram level: ~100k answer tokens of a typical SFT set
_CHUNK = 64


def _config(model: Any) -> Any:
    base = getattr(model, "get_base_model", None)  # a peft model: the wrapped transformers model
    inner = base() if callable(base) else model
    return getattr(inner, "config", None) or getattr(model, "config", None)


def _is_classifier(model: Any) -> bool:
    base = getattr(model, "get_base_model", None)
    inner = base() if callable(base) else model
    return type(inner).__name__.endswith("ForSequenceClassification")


def model_references(model: Any) -> References:
    """The uniform level from the model's vocabulary or label count."""
    cfg = _config(model)
    if cfg is None:
        return References()
    if _is_classifier(model):
        n = getattr(cfg, "num_labels", None)
        what = "classes"
    else:
        n = getattr(cfg, "vocab_size", None)
        what = "vocabulary"
    level = uniform_level(n if isinstance(n, int) else None)
    return References(uniform=level, sources={"uniform": f"ln {n} ({what})"} if level is not None else {})


def count_labels(batches: Iterable[Any], *, shift: bool) -> Counter[int]:
    """Label token counts over collated batches (``labels`` of shape rows x positions, or one
    class id per row), ``-100`` left out; with ``shift`` the first position of each row too."""
    counts: Counter[int] = Counter()
    for batch in batches:
        labels = batch.get("labels") if hasattr(batch, "get") else None
        if labels is None:
            continue
        if hasattr(labels, "detach"):
            labels = labels.detach().cpu().numpy()
        try:
            arr = np.asarray(labels, dtype=np.int64)
        except (TypeError, ValueError):  # ragged rows
            for row in labels:
                counts.update(int(t) for t in (row[1:] if shift else row) if int(t) != IGNORE_INDEX)
            continue
        if arr.ndim == 2 and shift:
            arr = arr[:, 1:]
        values, n = np.unique(arr[arr != IGNORE_INDEX], return_counts=True)
        counts.update(dict(zip(values.tolist(), n.tolist(), strict=True)))
    return counts


def label_references(rows: Sequence[Any], collator: Callable[[list[Any]], Any] | None = None, *,
                     shift: bool = True, limit: int = ROWS) -> References:
    """The unigram level of the first ``limit`` rows' labels, collated as training collates them
    (a collator that builds ``labels`` from ``input_ids`` is honoured)."""
    take = list(rows[: min(len(rows), limit)])
    if not take:
        return References()
    with _rng_kept():
        batches = [collator(take[i:i + _CHUNK]) if collator is not None else {"labels": _stack(take[i:i + _CHUNK])}
                   for i in range(0, len(take), _CHUNK)]
    counts = count_labels(batches, shift=shift)
    level = entropy(counts)
    if level is None or level <= 0:
        return References()
    n = sum(counts.values())
    return References(unigram=level, sources={"unigram": f"entropy of {n} label tokens in the first {len(take)} rows"})


def _stack(rows: list[Any]) -> list[Any]:
    return [r.get("labels") for r in rows if hasattr(r, "get") and r.get("labels") is not None]


class _rng_kept:
    """Python's, numpy's and torch's CPU generators as they were (a collator may draw from them)."""

    def __enter__(self) -> None:
        import torch

        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def __exit__(self, *exc: Any) -> None:
        import torch

        py, npy, tch = self.states
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(tch)


def run_references(trainer: Any, model: Any) -> References:
    """Everything knowable at train begin; parts that cannot be read stay unknown (logged)."""
    refs = References()
    objective = objective_from_trainer(trainer)
    if objective is not Objective.UNKNOWN:
        refs = References(objective=objective,
                          sources={"objective": f"trainer class {type(trainer).__name__}"})
    if not objective.is_convergence_signal:
        return refs
    try:
        refs = refs.merged(model_references(model))
    except Exception as err:  # noqa: BLE001 - an odd model leaves the level unknown, nothing more
        logger.info("lossguard: no uniform level (%s)", err)
    dataset = getattr(trainer, "train_dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        return refs
    try:
        cfg = _config(model)
        shift = not _is_classifier(model) and not bool(getattr(cfg, "is_encoder_decoder", False))
        rows = [dataset[i] for i in range(min(len(dataset), ROWS))]
        refs = refs.merged(label_references(rows, getattr(trainer, "data_collator", None), shift=shift))
    except Exception as err:  # noqa: BLE001 - rows the collator cannot batch alone: no unigram level
        logger.info("lossguard: no unigram level (%s: %s)", type(err).__name__, err)
    return refs

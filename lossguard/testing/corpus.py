"""The corpus of real training logs (``benchmarks/corpus``): the judge of every detector.

Each entry is a log that someone else wrote in a public repository (a Trainer
``trainer_state.json``, a LLaMA-Factory ``trainer_log.jsonl``, a Lightning ``metrics.csv``),
labelled by eye against ``benchmarks/corpus/RUBRIC.md``, with its provenance. The log is read
through lossguard's own foreign readers, so a detector sees exactly what ``lossguard watch``
would see on that file. Nobody tunes on the ``test`` split.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from lossguard.errors import LogReadError
from lossguard.telemetry.foreign import read_lightning_csv, read_llamafactory, read_trainer_state
from lossguard.telemetry.runlog import RunLog

CORPUS_ENV = "LOSSGUARD_CORPUS"


class Label(str, Enum):
    """What a person saw in the plot of a log (see RUBRIC.md for the boundaries)."""

    HEALTHY = "healthy"
    STAIRCASE = "staircase"
    PREMATURE_PLATEAU = "premature_plateau"
    DIVERGENCE = "divergence"
    SPIKE = "spike"
    NONFINITE = "nonfinite"
    ZERO_LOSS = "zero_loss"
    PREFERENCE_RL = "preference_rl"
    UNUSABLE = "unusable"

    @property
    def is_healthy(self) -> bool:
        """A run nothing should be reported on (a staircase is a healthy multi-epoch run)."""
        return self in (Label.HEALTHY, Label.STAIRCASE)


class Split(str, Enum):
    DEV = "dev"
    TEST = "test"


FORMATS = ("trainer_state", "llamafactory", "lightning")
TASKS = ("sft", "classification", "seq2seq", "asr", "dpo", "kto", "orpo", "grpo", "reward", "pretrain", "other")
ADAPTERS = ("lora", "qlora", "full", "unknown")
FLAGS = (
    "staircase", "sparse", "short", "warmup", "eval_only", "overfit", "resumed", "last_value",
    "grad_spike", "grad_nonfinite", "lr_zero", "noisy", "seq2seq_small", "prefix", "rounded",
    "fast_drop", "short_run", "slow_start",
)
ANOMALIES = (Label.PREMATURE_PLATEAU, Label.DIVERGENCE, Label.SPIKE, Label.NONFINITE, Label.ZERO_LOSS)
"""Labels that carry an ``onset_step``: where the trouble starts."""

_READERS = {
    "trainer_state": read_trainer_state,
    "llamafactory": read_llamafactory,
    "lightning": read_lightning_csv,
}


@dataclass(frozen=True)
class CorpusLog:
    """One labelled real log, its provenance, and the run as lossguard's readers see it."""

    id: str
    file: Path
    format: str
    repo: str
    path: str
    commit: str
    split: Split
    task: str
    adapter: str
    model: str | None
    n_values: int
    log_every: int | None
    epochs: float | None
    label: Label
    flags: tuple[str, ...]
    onset_step: int | None
    notes: str
    log: RunLog


TEST_SHARE = 0.35


def hashed_split(repo: str) -> Split:
    """The split a repository falls in before any manual move: sha1 of its name, 35% to test."""
    h = int(hashlib.sha1(repo.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return Split.TEST if h < TEST_SHARE else Split.DEV


def corpus_dir() -> Path:
    """``benchmarks/corpus`` of this checkout (or ``$LOSSGUARD_CORPUS``)."""
    env = os.environ.get(CORPUS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "benchmarks" / "corpus"


def read_labels(root: Path | None = None) -> list[dict[str, Any]]:
    """The raw rows of ``labels.jsonl``, in file order."""
    root = root or corpus_dir()
    labels = root / "labels.jsonl"
    if not labels.is_file():
        raise LogReadError(f"{labels}: no corpus labels here (the corpus lives in a source checkout)")
    rows = []
    with open(labels, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise LogReadError(f"{labels}:{n}: {err.msg}") from None
    return rows


def read_log(row: dict[str, Any], root: Path | None = None) -> RunLog:
    """The run of one labels row, read by the foreign reader of its format."""
    root = root or corpus_dir()
    reader = _READERS.get(row.get("format", ""))
    if reader is None:
        raise LogReadError(f"{row.get('id')}: unknown corpus format {row.get('format')!r}")
    return reader(root / row["file"])


def load_corpus(
    split: Split | str | None = None,
    labels: Label | str | list[Label | str] | tuple[Label | str, ...] | set[Label | str] | None = None,
    *,
    root: Path | None = None,
) -> list[CorpusLog]:
    """Labelled real logs, optionally one split and some labels only, in id order.

    Raises:
        LogReadError: the corpus is missing, or one of its files cannot be read.
        ValueError: an unknown split or label was asked for.
    """
    root = root or corpus_dir()
    want_split = Split(split) if split is not None else None
    if labels is None:
        want_labels = None
    elif isinstance(labels, (str, Label)):
        want_labels = {Label(labels)}
    else:
        want_labels = {Label(x) for x in labels}
    out = []
    for row in read_labels(root):
        row_split, row_label = Split(row["split"]), Label(row["label"])
        if want_split is not None and row_split != want_split:
            continue
        if want_labels is not None and row_label not in want_labels:
            continue
        out.append(
            CorpusLog(
                id=row["id"], file=root / row["file"], format=row["format"], repo=row["repo"],
                path=row["path"], commit=row["commit"], split=row_split, task=row["task"],
                adapter=row["adapter"], model=row.get("model"), n_values=row["n_values"],
                log_every=row.get("log_every"), epochs=row.get("epochs"), label=row_label,
                flags=tuple(row.get("flags", ())), onset_step=row.get("onset_step"),
                notes=row.get("notes", ""), log=read_log(row, root),
            )
        )
    out.sort(key=lambda c: c.id)
    return out

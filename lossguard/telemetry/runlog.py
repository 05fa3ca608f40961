"""A run as read from any log: samples, findings, actions, probes, GPU records.

``RunLog`` is what every reader produces and what the watcher, report and ``load_run`` consume,
whatever wrote the log (lossguard's telemetry, the Trainer's ``trainer_state.json``,
LLaMA-Factory, Lightning).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

from lossguard.numbers import MAX_STEP, as_float, as_step
from lossguard.records import Action, Columns, Finding, Sample

_COLUMNS = ("loss", "grad_norm", "lr", "epoch")


class SampleColumns(Columns):
    """The samples of a run as arrays (one row per step, step order, last duplicate wins): the
    detectors' ``Columns``, read from a million-sample log without a million objects."""

    @classmethod
    def from_records(cls, recs: list[dict[str, Any]]) -> SampleColumns:
        """Columns of ``kind == "sample"`` records, read as ``Sample.from_record`` reads them."""
        return cls.from_record_batches([recs])

    @classmethod
    def from_record_batches(cls, batches: Iterable[list[dict[str, Any]]],
                            cuts: Sequence[tuple[int, int]] = ()) -> SampleColumns:
        """``from_records`` over the concatenation of ``batches``, without building one big list.

        ``cuts``: (number of batches before it, step) pairs, filled in while ``batches`` is read:
        a resumed run started at that step there, so the samples of earlier batches past that
        step belong to the branch the resume abandoned and are dropped.
        """
        import numpy as np

        parts: list[Any] = [_batch_columns(recs) if recs else None for recs in batches]
        for before, step in cuts:
            for i in range(min(before, len(parts))):
                if parts[i] is not None and bool((parts[i][0] > step).any()):
                    keep = parts[i][0] <= step
                    parts[i] = (parts[i][0][keep], {k: (v[keep], h[keep]) for k, (v, h) in parts[i][1].items()})
        parts = [p for p in parts if p is not None]
        if parts:
            st_arr = np.concatenate([p[0] for p in parts])
            cols = {name: (np.concatenate([p[1][name][0] for p in parts]),
                           np.concatenate([p[1][name][1] for p in parts])) for name in _COLUMNS}
        else:
            st_arr = np.zeros(0, dtype=np.int64)
            cols = {name: (np.zeros(0, dtype=float), np.zeros(0, dtype=bool)) for name in _COLUMNS}
        if len(st_arr) and bool(np.all(st_arr[1:] > st_arr[:-1])):
            last = slice(None)  # the usual log: steps strictly increasing, nothing to sort or drop
        else:
            order = np.argsort(st_arr, kind="stable")
            s = st_arr[order]
            last = order[np.concatenate([s[1:] != s[:-1], [True]])] if len(s) else order
        return cls(
            steps=st_arr[last], loss=cols["loss"][0][last], grad_norm=cols["grad_norm"][0][last],
            lr=cols["lr"][0][last], epoch=cols["epoch"][0][last],
            has_loss=cols["loss"][1][last], has_grad_norm=cols["grad_norm"][1][last],
        )


def _batch_columns(recs: list[dict[str, Any]]) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """Steps and (values, logged) per column of one batch of sample records, unsorted."""
    import numpy as np

    raw_steps = list(map(dict.get, recs, repeat("step")))
    if set(map(type, raw_steps)) == {int} and min(raw_steps) >= 0 and max(raw_steps) <= MAX_STEP:
        steps = raw_steps
        keep = recs
    else:
        steps = []
        keep = []
        for r, raw in zip(recs, raw_steps):
            st = as_step(raw)
            if st is not None:
                steps.append(st)
                keep.append(r)
    cols = {}
    for name in _COLUMNS:
        vals = list(map(dict.get, keep, repeat(name)))
        try:
            if bool in set(map(type, vals)):  # true/false are no numbers, but numpy reads them as 1/0
                raise ValueError(name)
            arr = np.array(vals, dtype=float)
            if arr.ndim != 1:
                raise ValueError(name)
        except (TypeError, ValueError, OverflowError):
            conv = [as_float(v) for v in vals]
            arr = np.array([_nan(v) for v in conv], dtype=float)
            has = np.array([v is not None for v in conv], dtype=bool)
        else:
            # NaN is a missing value (None) or a logged NaN: only those need a look, unless
            # every NaN is a None
            has = ~np.isnan(arr)
            missing = np.flatnonzero(~has)
            if len(missing) and vals.count(None) != len(missing):
                has[missing] = [vals[i] is not None for i in missing.tolist()]
        cols[name] = (arr, has)
    return np.array(steps, dtype=np.int64), cols


def _nan(v: float | None) -> float:
    return float("nan") if v is None else v


@dataclass
class RunLog:
    """Everything known about one run, in step order, one sample per step (the last wins)."""

    source: str
    path: Path
    run: dict[str, Any] | None = None
    samples: list[Sample] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    gpu: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    preflight: dict[str, Any] | None = None
    references: dict[str, Any] | None = None  # the ``references`` record the callback wrote
    metric_keys: set[str] = field(default_factory=set)  # keys a foreign log's entries carry
    max_steps: int | None = None
    num_train_epochs: float | None = None
    ended: bool = False
    columns: SampleColumns | None = None  # set by the columnar reader instead of ``samples``
    _index: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def last_step(self) -> int | None:
        return self.samples[-1].step if self.samples else None

    def add_sample(self, sample: Sample) -> None:
        """Add or replace the sample of ``sample.step`` (duplicated steps: the last wins)."""
        at = self._index.get(sample.step)
        if at is not None:
            self.samples[at] = sample
            return
        if self.samples and sample.step < self.samples[-1].step:
            # out of order (rare: merged logs); keep the list sorted
            self.samples.append(sample)
            self.samples.sort(key=lambda s: s.step)
            self._index = {s.step: i for i, s in enumerate(self.samples)}
            return
        self._index[sample.step] = len(self.samples)
        self.samples.append(sample)

    def cut_after(self, step: int) -> None:
        """A run resumed at ``step`` starts here: what the log holds past ``step`` so far belongs
        to the branch the resume abandoned (a run killed later than its last checkpoint), and goes."""
        def alive(rec_step: Any) -> bool:
            st = as_step(rec_step)
            return st is None or st <= step

        self.findings = [f for f in self.findings if f.step <= step]
        self.actions = [a for a in self.actions if a.step <= step]
        self.probes = [r for r in self.probes if alive(r.get("step"))]
        self.gpu = [r for r in self.gpu if alive(r.get("step"))]
        self.evals = [r for r in self.evals if alive(r.get("step"))]
        if self.samples and self.samples[-1].step > step:
            self.samples = [s for s in self.samples if s.step <= step]
            self._index = {s.step: i for i, s in enumerate(self.samples)}

    def add_record(self, rec: dict[str, Any]) -> None:
        """Fold one lossguard telemetry record in; unknown kinds are ignored (forward compatible)."""
        kind = rec.get("kind")
        try:
            if kind == "sample":
                if rec.get("step") is not None:
                    self.add_sample(Sample.from_record(rec))
            elif kind == "finding":
                self.findings.append(Finding.from_record(rec))
            elif kind == "action":
                self.actions.append(Action.from_record(rec))
            elif kind == "probe":
                self.probes.append(rec)
            elif kind == "gpu":
                self.gpu.append(rec)
            elif kind == "eval":
                self.evals.append(rec)
            elif kind == "preflight":
                self.preflight = rec
            elif kind == "references":
                self.references = rec
            elif kind == "run":
                start = branch_point(rec)
                if start is not None:
                    self.cut_after(start)
                self.run = rec
                self.ended = False
                ms = as_step(rec.get("max_steps"))
                self.max_steps = ms if ms else self.max_steps
                ne = as_float(rec.get("num_train_epochs"))
                self.num_train_epochs = ne if ne is not None else self.num_train_epochs
            elif kind == "end":
                self.ended = True
        except (TypeError, ValueError, KeyError):
            pass  # one malformed record must not hide the rest of the run


def branch_point(rec: dict[str, Any]) -> int | None:
    """The step a ``run`` record's training started from (0 for a fresh run, the checkpoint's step
    for a resumed one); None for a record without it (an older lossguard)."""
    if rec.get("kind") != "run":
        return None
    return as_step(rec.get("start_step"))

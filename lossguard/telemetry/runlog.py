"""A run as read from any log: samples, findings, actions, probes, GPU records.

``RunLog`` is what every reader produces and what the watcher, report and ``load_run`` consume,
whatever wrote the log (lossguard's telemetry, the Trainer's ``trainer_state.json``,
LLaMA-Factory, Lightning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lossguard.records import Action, Finding, Sample, _opt_float
from lossguard.telemetry.schema import as_float

_COLUMNS = ("loss", "grad_norm", "lr", "epoch")


@dataclass
class SampleColumns:
    """The samples of a run as arrays (one row per step, step order, last duplicate wins).

    What the offline analysis needs from a million-sample log without a million objects: a
    missing value is NaN, and ``has_loss`` / ``has_grad_norm`` tell it from a logged NaN.
    """

    steps: Any
    loss: Any
    grad_norm: Any
    lr: Any
    epoch: Any
    has_loss: Any
    has_grad_norm: Any

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def last_step(self) -> int | None:
        return int(self.steps[-1]) if len(self.steps) else None

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> SampleColumns:
        import numpy as np

        def col(name: str) -> Any:
            return np.array([_nan(getattr(s, name)) for s in samples], dtype=float)

        return cls(
            steps=np.array([s.step for s in samples], dtype=np.int64),
            loss=col("loss"), grad_norm=col("grad_norm"), lr=col("lr"), epoch=col("epoch"),
            has_loss=np.array([s.loss is not None for s in samples], dtype=bool),
            has_grad_norm=np.array([s.grad_norm is not None for s in samples], dtype=bool),
        )

    @classmethod
    def from_records(cls, recs: list[dict[str, Any]]) -> SampleColumns:
        """Columns of ``kind == "sample"`` records, read as ``Sample.from_record`` reads them."""
        import numpy as np

        steps: list[int] = []
        keep: list[dict[str, Any]] = []
        for r in recs:
            st = r.get("step")
            if type(st) is not int:
                try:
                    st = int(st)  # type: ignore[arg-type]
                except (TypeError, ValueError, OverflowError):
                    continue
            steps.append(st)
            keep.append(r)
        cols = {}
        for name in _COLUMNS:
            vals = [r.get(name) for r in keep]
            try:
                arr = np.array(vals, dtype=float)
                has = np.array([v is not None for v in vals], dtype=bool)
            except (TypeError, ValueError):
                conv = [_opt_float(v) for v in vals]
                arr = np.array([_nan(v) for v in conv], dtype=float)
                has = np.array([v is not None for v in conv], dtype=bool)
            cols[name] = (arr, has)
        st_arr = np.array(steps, dtype=np.int64)
        order = np.argsort(st_arr, kind="stable")
        s = st_arr[order]
        last = order[np.concatenate([s[1:] != s[:-1], [True]])] if len(s) else order
        return cls(
            steps=st_arr[last], loss=cols["loss"][0][last], grad_norm=cols["grad_norm"][0][last],
            lr=cols["lr"][0][last], epoch=cols["epoch"][0][last],
            has_loss=cols["loss"][1][last], has_grad_norm=cols["grad_norm"][1][last],
        )


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
            elif kind == "run":
                self.run = rec
                self.ended = False
                ms = as_float(rec.get("max_steps"))
                self.max_steps = int(ms) if ms is not None and ms > 0 else self.max_steps
                ne = as_float(rec.get("num_train_epochs"))
                self.num_train_epochs = ne if ne is not None else self.num_train_epochs
            elif kind == "end":
                self.ended = True
        except (TypeError, ValueError, KeyError):
            pass  # one malformed record must not hide the rest of the run

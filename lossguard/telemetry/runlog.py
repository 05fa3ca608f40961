"""A run as read from any log: samples, findings, actions, probes, GPU records.

``RunLog`` is what every reader produces and what the watcher, report and ``load_run`` consume,
whatever wrote the log (lossguard's telemetry, the Trainer's ``trainer_state.json``,
LLaMA-Factory, Lightning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lossguard.records import Action, Finding, Sample
from lossguard.telemetry.schema import as_float


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

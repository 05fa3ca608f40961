"""The vocabulary shared by every layer: what was measured, what was found, what was done.

Pure stdlib (``Columns`` builds numpy arrays, and imports numpy when it does). Every record type
converts to and from the plain dict that the telemetry log stores (``to_record`` /
``from_record``), so the trainer and the watcher speak one language.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lossguard.numbers import MAX_STEP as MAX_STEP
from lossguard.numbers import as_float, as_int
from lossguard.numbers import as_step as as_step

if TYPE_CHECKING:
    import numpy as np


class Severity(str, enum.Enum):
    """How urgently the person training should look."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


class Reason(str, enum.Enum):
    """What kind of trouble a finding reports."""

    NONFINITE = "nonfinite"
    SPIKE = "spike"
    DIVERGENCE = "divergence"
    EARLY_CONVERGENCE = "early_convergence"
    GRAD_EXPLOSION = "grad_explosion"
    GRAD_VANISHING = "grad_vanishing"
    LR_TOO_HIGH = "lr_too_high"
    ZERO_LOSS = "zero_loss"
    NOT_A_CONVERGENCE_SIGNAL = "not_a_convergence_signal"
    RELAPSE = "relapse"
    GAVE_UP = "gave_up"
    LOSSGUARD_ERROR = "lossguard_error"


class ProbeVerdict(str, enum.Enum):
    """What the Hessian probe says about the point training sits at (``probes/hessian.py``)."""

    SADDLE = "saddle"
    INCONCLUSIVE = "inconclusive"
    MINIMUM = "minimum"
    DEGENERATE = "degenerate"


class ActionKind(str, enum.Enum):
    """What lossguard did to (or around) training."""

    ROLLBACK = "rollback"
    LR_OVERRIDE = "lr_override"
    LR_RESTORE = "lr_restore"
    SAVE = "save"
    PROBE = "probe"
    GIVE_UP = "give_up"
    KEEP = "keep"  # the safety net's verdict: the recovered branch beat the one it abandoned
    REVERT = "revert"  # it did not: back to the abandoned branch's head
    DECLINE = "decline"  # a rollback not carried out: the held-out loss says the run improved since the onset


def as_reason(value: Any) -> Reason | None:
    """A reason read from a log; None when missing or not one this version knows."""
    try:
        return Reason(value)
    except ValueError:
        return None


@dataclass
class Sample:
    """One optimizer step as the person training sees it.

    ``loss`` is the mean over the step's accumulated micro-batches (all-reduced across ranks);
    ``grad_norm`` is measured before clipping; ``lr`` is the rate that ``optimizer.step()`` used.
    Any field but ``step`` may be missing (``None``) when the source does not record it.
    """

    step: int
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    epoch: float | None = None
    step_time_s: float | None = None
    tokens: int | None = None
    t: float | None = None

    def to_record(self) -> dict[str, Any]:
        # built by hand: dataclasses.asdict is slow for a call made every training step
        rec: dict[str, Any] = {"kind": "sample", "step": self.step, "loss": self.loss}
        for key in ("grad_norm", "lr", "epoch", "step_time_s", "tokens", "t"):
            value = getattr(self, key)
            if value is not None:
                rec[key] = value
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Sample:
        step = as_step(rec["step"])
        if step is None:
            raise ValueError(f"not a step: {rec['step']!r}")
        return cls(
            step=step,
            loss=as_float(rec.get("loss")),
            grad_norm=as_float(rec.get("grad_norm")),
            lr=as_float(rec.get("lr")),
            epoch=as_float(rec.get("epoch")),
            step_time_s=as_float(rec.get("step_time_s")),
            tokens=as_int(rec.get("tokens")),
            t=as_float(rec.get("t")),
        )


@dataclass
class Finding:
    """Something a detector saw, with the numbers that justify it.

    ``step`` is where it was detected; ``onset_step`` where the trouble began (a plateau is
    detected well after it starts, and recovery must roll back to before the onset).
    """

    reason: Reason
    severity: Severity
    step: int
    onset_step: int
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    detector: str = ""

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": "finding",
            "reason": self.reason.value,
            "severity": self.severity.value,
            "step": self.step,
            "onset_step": self.onset_step,
            "message": self.message,
            "evidence": dict(self.evidence),
            "detector": self.detector,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Finding:
        try:
            reason = Reason(rec.get("reason"))
        except ValueError:
            reason = Reason.LOSSGUARD_ERROR
        try:
            severity = Severity(rec.get("severity"))
        except ValueError:
            severity = Severity.WARNING
        step = as_int(rec.get("step")) or 0
        onset = as_int(rec.get("onset_step"))
        return cls(
            reason=reason,
            severity=severity,
            step=step,
            onset_step=step if onset is None else onset,
            message=str(rec.get("message", "")),
            evidence=dict(rec.get("evidence") or {}),
            detector=str(rec.get("detector", "")),
        )

    def summary(self) -> dict[str, Any]:
        """The five fields that ``watch --once --json`` prints."""
        return {
            "reason": self.reason.value,
            "severity": self.severity.value,
            "step": self.step,
            "onset_step": self.onset_step,
            "message": self.message,
        }


@dataclass
class Action:
    """Something lossguard did: a rollback, an LR change, a save, a probe, giving up."""

    action: ActionKind
    step: int
    message: str
    from_step: int | None = None
    to_step: int | None = None
    lr_factor: float | None = None
    reason: Reason | None = None  # the trouble it answers
    details: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": "action",
            "action": self.action.value,
            "step": self.step,
            "from_step": self.from_step,
            "to_step": self.to_step,
            "lr_factor": self.lr_factor,
            "reason": None if self.reason is None else self.reason.value,
            "message": self.message,
            "details": dict(self.details),
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Action:
        try:
            kind = ActionKind(rec.get("action"))
        except ValueError:
            kind = ActionKind.GIVE_UP
        return cls(
            action=kind,
            step=as_int(rec.get("step")) or 0,
            message=str(rec.get("message", "")),
            from_step=as_int(rec.get("from_step")),
            to_step=as_int(rec.get("to_step")),
            lr_factor=as_float(rec.get("lr_factor")),
            reason=as_reason(rec.get("reason")),
            details=dict(rec.get("details") or {}),
        )


@dataclass(frozen=True)
class Columns:
    """A stretch of samples as arrays, in step order: what a detector's batch path reads.

    A missing value is NaN; ``has_loss`` / ``has_grad_norm`` tell a missing value from a logged
    NaN (a non-finite loss is trouble, a loss that was not logged is not). numpy is imported
    where arrays are built: this module stays stdlib to import.
    """

    steps: np.ndarray  # int64
    loss: np.ndarray  # float64, like the others
    grad_norm: np.ndarray
    lr: np.ndarray
    epoch: np.ndarray
    has_loss: np.ndarray  # bool
    has_grad_norm: np.ndarray  # bool

    @classmethod
    def of(cls, steps: Any, loss: Any = None, grad_norm: Any = None, lr: Any = None, epoch: Any = None, *,
           has_loss: Any = None, has_grad_norm: Any = None) -> Columns:
        """Columns from array-likes; a column that is None is all missing. By default every loss
        is logged, and a grad norm is logged where it is not NaN."""
        import numpy as np

        st = np.asarray(steps, dtype=np.int64)
        n = len(st)

        def col(a: Any) -> np.ndarray:
            return np.full(n, np.nan) if a is None else np.asarray(a, dtype=float)

        gn = col(grad_norm)
        return cls(st, col(loss), gn, col(lr), col(epoch),
                   np.ones(n, dtype=bool) if has_loss is None else np.asarray(has_loss, dtype=bool),
                   ~np.isnan(gn) if has_grad_norm is None else np.asarray(has_grad_norm, dtype=bool))

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> Columns:
        """Columns of samples (None is missing)."""
        import numpy as np

        def col(name: str) -> np.ndarray:
            values = (getattr(s, name) for s in samples)
            return np.array([np.nan if v is None else v for v in values], dtype=float)

        return cls(np.array([s.step for s in samples], dtype=np.int64), col("loss"), col("grad_norm"),
                   col("lr"), col("epoch"), np.array([s.loss is not None for s in samples], dtype=bool),
                   np.array([s.grad_norm is not None for s in samples], dtype=bool))

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def last_step(self) -> int | None:
        return int(self.steps[-1]) if len(self.steps) else None

    def __getitem__(self, rows: slice) -> Columns:
        """A stretch of the rows (views, not copies)."""
        return Columns(self.steps[rows], self.loss[rows], self.grad_norm[rows], self.lr[rows], self.epoch[rows],
                       self.has_loss[rows], self.has_grad_norm[rows])


def worst_severity(findings: list[Finding]) -> Severity | None:
    """The most severe level among ``findings`` (None when there are none)."""
    if not findings:
        return None
    return max((f.severity for f in findings), key=lambda s: s.rank)

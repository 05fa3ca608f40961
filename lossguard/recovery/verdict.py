"""Is a recovery better than the branch it abandoned? The judge's rule, pure.

A rollback is an experiment. Both branches, the abandoned head and the recovered branch at equal
compute, are scored on the same fixed evaluation sequences: ``Scores`` holds one mean token loss
and one token count per unit (a sequence, or a batch where per-sequence losses are not
available). The rule pairs the units: d_i = head_i - branch_i, positive where the recovery does
better. Their token-weighted mean is exactly head score - branch score, and its standard error,
estimated from the spread of the d_i, is the noise of the evaluation set itself. The recovery is
kept only when its gain clears ``z`` standard errors; anything less is indistinguishable from
doing nothing, and doing nothing (the head) wins the tie. Stdlib only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scores:
    """One model state's losses on the judge's units: mean token loss and token count per unit."""

    losses: tuple[float, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.losses) != len(self.weights):
            raise ValueError(f"{len(self.losses)} losses for {len(self.weights)} weights")

    @classmethod
    def of(cls, losses: Sequence[float], weights: Sequence[float]) -> Scores:
        return cls(tuple(float(v) for v in losses), tuple(float(w) for w in weights))

    @property
    def units(self) -> int:
        """Units that carry tokens (a unit with none says nothing)."""
        return sum(1 for w in self.weights if w > 0)

    @property
    def mean(self) -> float:
        """Token-weighted mean loss over all units (NaN without tokens; NaN or inf if any unit is)."""
        total = sum(self.weights)
        if total <= 0:
            return math.nan
        return sum(w * v for v, w in zip(self.losses, self.weights) if w > 0) / total

    def to_record(self) -> dict[str, Any]:
        return {"losses": [_jsonable(v) for v in self.losses], "weights": list(self.weights)}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Scores:
        return cls.of([float(v) for v in rec["losses"]], [float(w) for w in rec["weights"]])


@dataclass(frozen=True)
class Verdict:
    """The judge's decision with its numbers: ``gain`` = head - branch, ``stderr`` its noise."""

    keep: bool
    head: float
    branch: float
    gain: float
    stderr: float
    z: float
    units: int
    why: str

    def details(self) -> dict[str, Any]:
        """What the ``keep`` / ``revert`` action record carries."""
        return {"head_score": _jsonable(self.head), "branch_score": _jsonable(self.branch),
                "gain": _jsonable(self.gain), "stderr": _jsonable(self.stderr), "z": self.z,
                "units": self.units}


def paired_gain(head: Scores, branch: Scores) -> tuple[float, float, int]:
    """(gain, standard error, units): the token-weighted mean of head_i - branch_i over the
    units both scored, and its standard error from their spread (the ratio estimator's, with
    the n / (n - 1) small-sample correction); the error is infinite below two units."""
    if len(head.losses) != len(branch.losses):
        raise ValueError(f"the branches were scored on different units ({len(head.losses)} and "
                         f"{len(branch.losses)}): not the same evaluation batches")
    pairs = [(h - b, w) for h, b, w, wb in zip(head.losses, branch.losses, head.weights, branch.weights)
             if w > 0 and wb > 0]
    n = len(pairs)
    total = sum(w for _, w in pairs)
    if n == 0 or total <= 0:
        return math.nan, math.inf, 0
    gain = sum(d * w for d, w in pairs) / total
    if n < 2:
        return gain, math.inf, n
    var = n / (n - 1) * sum((w * (d - gain)) ** 2 for d, w in pairs) / total**2
    return gain, math.sqrt(var), n


def judge(head: Scores, branch: Scores, z: float) -> Verdict:
    """Keep the recovered branch only if it beats the abandoned head by more than ``z`` standard errors.

    A head whose loss is not finite (the weights a NaN left behind) loses to any finite branch;
    a branch whose loss is not finite loses to a finite head.
    """
    h, b = head.mean, branch.mean
    if not math.isfinite(h) or not math.isfinite(b):
        keep = math.isfinite(b) and not math.isfinite(h)
        why = (f"the abandoned head's held-out loss is {_fmt(h)} and the recovered branch's {_fmt(b)}")
        return Verdict(keep, h, b, h - b if keep else math.nan, math.nan, z, head.units, why)
    gain, se, n = paired_gain(head, branch)
    threshold = z * se
    keep = math.isfinite(threshold) and gain > threshold
    noise = f"{z:g} x {_fmt(se)} over {n} paired units" if math.isfinite(se) else f"unknown from {n} unit(s)"
    if keep:
        why = (f"the recovered branch's held-out loss {_fmt(b)} beats the abandoned head's {_fmt(h)} by "
               f"{_fmt(gain)}, more than the evaluation noise ({noise})")
    elif gain > 0:
        why = (f"the recovered branch's held-out loss {_fmt(b)} beats the abandoned head's {_fmt(h)} by only "
               f"{_fmt(gain)}, within the evaluation noise ({noise})")
    else:
        why = f"the recovered branch's held-out loss {_fmt(b)} is no better than the abandoned head's {_fmt(h)}"
    return Verdict(keep, h, b, gain, se, z, n, why)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _jsonable(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)

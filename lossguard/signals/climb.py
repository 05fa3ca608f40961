"""Divergence on short logs: a loss that climbs well above its best and stays there.

The divergence detector's trend test needs dozens of values; a Trainer that logs every 500
steps writes five in a run. Each of those values is already an average over hundreds of steps,
so a few of them say a lot: when the last three sit clearly above the best the run had reached
(its smoothed minimum, a median of three so one lucky value does not set it), the run has
climbed and not come back. That is a divergence (an LR too high for the model, a broken
batch stream), found from as few as five logged values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lossguard.config import DetectionConfig
from lossguard.numbers import fmt
from lossguard.records import Columns, Finding, Reason, Sample, Severity

_MIN_VALUES = 5
_MIN_GAP = 5  # steps between logged values: each is an average over a logging interval
_NOISE_VALUES = 16  # the noise is the recent values' (a smooth early fall says nothing of a noisy tail)  # past this many values a log is dense enough for the trend test


class ClimbDetector:
    """The median of the last three logged values is ``climb_factor`` times the best level
    before them (the first value, or a median of three), ``climb_z`` times the log's own
    value-to-value noise above it, and none of the three is back near it.

    Only on logs with values ``_MIN_GAP`` or more steps apart (averages over a logging interval,
    not single batches: the callback's per-step record never qualifies), and only while a log is
    too short for the trend test (fewer values than ``divergence_window``):
    on longer real logs, noisy ones above all, the minimum of many medians sits far enough below
    the typical level that three values above it say little (measured on the corpus's dev split).
    One finding per climb; it re-arms when the loss comes back under the factor.
    """

    name = "climb"

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.steps: list[int] = []
        self.values: list[float] = []
        self.best = math.inf  # smoothed minimum before the last three values
        self.active = False
        self.last_step: int | None = None
        self.dense = False  # two values fewer than _MIN_GAP steps apart: not a sparse log

    def update(self, sample: Sample) -> Finding | None:
        loss = sample.loss
        if loss is None or not math.isfinite(loss):
            return None
        if self.last_step is not None and sample.step - self.last_step < _MIN_GAP:
            # values logged (nearly) every step are single batches: too noisy to judge by three
            # of them, and the trend test gets its 50 values soon enough
            self.dense = True
        self.last_step = sample.step
        if self.dense or len(self.values) >= self.config.divergence_window:
            return None  # (long enough for the trend test, ``divergence.py``)
        self.steps.append(sample.step)
        self.values.append(float(loss))
        return self._check()

    def _check(self) -> Finding | None:
        c = self.config
        n = len(self.values)
        v = self.values
        if n == 1:
            self.best = v[0]  # the start counts as it is: a run that rises above its start has climbed
        elif n >= 6:
            # the newest value before the last three with both neighbours before them: its median of three
            self.best = min(self.best, float(np.median(v[n - 6:n - 3])))
        if n < _MIN_VALUES:
            return None
        last = v[-3:]
        level = float(np.median(last))
        best = self.best
        if not (best > 0 and math.isfinite(best)):
            return None
        if self.active:
            if level < c.climb_factor * best:
                self.active = False
            return None
        if level < c.climb_factor * best or min(last) < (1.0 + 0.5 * (c.climb_factor - 1.0)) * best:
            return None
        # beyond the log's own scatter: value-to-value noise, robust to the climb's one jump
        d = np.diff(np.asarray(v[-_NOISE_VALUES:], dtype=float))
        noise = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0)
        if level - best <= c.climb_z * noise:
            return None
        self.active = True
        floor = (1.0 + 0.5 * (c.climb_factor - 1.0)) * best
        j = n - 1
        while j > 0 and v[j - 1] >= floor:
            j -= 1
        onset = self.steps[max(j - 1, 0)]
        step = self.steps[-1]
        return Finding(
            reason=Reason.DIVERGENCE,
            severity=Severity.WARNING,
            step=step,
            onset_step=onset,
            message=(
                f"Divergence at step {step}: the last three logged losses ({', '.join(fmt(x) for x in last)}) sit "
                f"at {level / best:.1f}x the best level the run had reached ({fmt(best)}), {(level - best) / max(noise, 1e-300):.0f}x "
                f"the log's value-to-value noise, and have not come back since step {self.steps[j]}."
            ),
            evidence={"rule": "climb", "level": level, "best": best, "ratio": level / best, "values": n,
                      "noise": noise},
            detector=self.name,
        )

    def update_many(self, columns: Columns) -> list[tuple[int, Finding]]:
        """``update`` over a stretch of steps; (row, finding) pairs, same results."""
        out = []
        losses, steps = columns.loss, columns.steps
        idx = np.flatnonzero(np.isfinite(losses))
        for k, i in enumerate(idx.tolist()):
            if self.dense or len(self.values) >= self.config.divergence_window:
                # nothing more is judged: only the bookkeeping ``update`` would do on the rest
                rest = steps[idx[k:]].astype(np.int64)
                prev = rest[:-1] if self.last_step is None else np.concatenate([[self.last_step], rest[:-1]])
                gaps = rest[1:] - rest[:-1] if self.last_step is None else rest - prev
                self.dense = self.dense or bool((gaps < _MIN_GAP).any())
                self.last_step = int(rest[-1])
                break
            f = self.update(Sample(step=int(steps[i]), loss=float(losses[i])))
            if f is not None:
                out.append((i, f))
        return out

    def reset_after_rollback(self, step: int) -> None:
        # the restored branch's values are a new curve; the best it had reached still stands
        self.active = False
        self.steps, self.values = [], []

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "values": list(self.values), "best": self.best,
                "active": self.active, "last_step": self.last_step, "dense": self.dense}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = [int(s) for s in state["steps"]]
        self.values = [float(x) for x in state["values"]]
        best = state["best"]
        self.best = math.inf if best is None else float(best)
        self.active = bool(state["active"])
        self.last_step = state.get("last_step")
        self.dense = bool(state.get("dense", False))

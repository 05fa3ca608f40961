"""The probe's time limit, checked between micro-batches so that no probe overruns by more than one.

A Hessian-vector product on a real model is computed micro-batch by micro-batch; the clock is
read before each one (calibration included), and once the deadline has passed the work stops
with ``BudgetSpent``. The overrun is then at most the one micro-batch product that was already
running when the deadline passed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class BudgetSpent(RuntimeError):
    """The probe's time budget ran out before the work asked for was done."""


class Deadline:
    """An absolute point on ``clock``; ``None`` seconds means no limit."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.start = clock()
        self.at = math.inf if seconds is None else self.start + max(0.0, seconds)

    def left(self) -> float:
        """Seconds until the deadline (negative once it has passed; ``inf`` without one)."""
        return self.at - self.clock()

    def spent(self) -> float:
        """Seconds since the deadline was set."""
        return self.clock() - self.start

    def check(self) -> None:
        """Raise ``BudgetSpent`` once the deadline has passed."""
        if self.clock() >= self.at:
            raise BudgetSpent(f"the probe's time budget ({self.at - self.start:.3g} s) is spent")

    def sooner(self, seconds: float) -> Deadline:
        """A deadline ``seconds`` from now, or this one if it comes first."""
        out = Deadline(seconds, self.clock)
        out.at = min(out.at, self.at)
        return out

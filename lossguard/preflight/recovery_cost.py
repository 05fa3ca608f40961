"""Preflight rows for what recovery will cost this run (the cost model of ``recovery.budget``).

The measurements (``recovery.cost.measure_cost``: snapshot bytes per rank, copy and disk
bandwidth, host memory, the probe's memory against free memory) are taken by the integration at
train begin; this module only words them. The snapshot cadence and the share of step time follow
once the first steps are timed (the ``cost`` record and its console line).
"""

from __future__ import annotations

from typing import Any

from lossguard.preflight.report import PreflightRow, Status


def check_recovery_cost(cost: Any, *, snapshot_budget: float = 0.01,
                        snapshot_every: int | None = None) -> list[PreflightRow]:
    """The cost model's rows: snapshot size, copy, host memory, spill disk, probe memory, cadence
    (``cost`` is a ``recovery.budget.SnapshotCost``, which words its own rows: preflight does not
    import the recovery package beside it)."""
    return [PreflightRow(name, value, Status.WARN if warn else Status.OK, advice)
            for name, value, warn, advice in cost.rows(budget=snapshot_budget, user_every=snapshot_every)]

"""What recovery costs a run, and how often to snapshot so that it stays within budget (pure).

A snapshot copies the trainable parameters and the optimizer state off the device (the
*capture*) and, once the in-memory ring holds more than ``snapshot_memory_mb``, writes one
snapshot's worth to disk (the *spill*). Per rank and per snapshot::

    bytes   = trainable parameter bytes + optimizer state bytes
              (AdamW: n x (w + 2 x w) with w the parameter's bytes per value)
    seconds = bytes / copy bandwidth  +  parameter bytes / check bandwidth
              +  bytes / disk bandwidth   (the last once it spills)

The check is the finite check of the parameters (a damaged state is no rollback target).

With a snapshot every E steps of t seconds, snapshots cost ``seconds / (E x t)`` of training
time. ``choose_cadence`` takes the finest cadence, never below ``DEFAULT_EVERY``, that keeps
this within ``snapshot_budget`` (1%). A cadence coarser than ``rollback_steps`` no longer lands
a rollback near the onset; the Trainer's own checkpoints then serve as rollback targets too,
when it writes any, and the cost line says so.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

DEFAULT_EVERY = 50  # finer snapshots buy nothing: a rollback lands rollback_steps + [0, E) before the onset
HOST_SHARE = 0.5  # a snapshot must fit in this share of the host's available memory


class CadenceReason(str, enum.Enum):
    """Why snapshots are taken every so many steps."""

    USER = "user"  # recovery.snapshot_every was set
    DEFAULT = "default"  # cheap: the default cadence is well within budget
    BUDGET = "budget"  # a coarser cadence keeps snapshots within budget
    CHECKPOINTS = "checkpoints"  # coarser than rollback_steps: the Trainer's checkpoints are targets too
    COARSE = "coarse"  # coarser than rollback_steps and no checkpoints to fall back on
    NO_ROOM = "no_room"  # one snapshot does not fit in host memory: no scheduled snapshots


@dataclass(frozen=True)
class SnapshotCost:
    """Sizes and bandwidths measured at train begin, for one rank."""

    trainable_params: int
    param_bytes: int
    optimizer_bytes: int
    optimizer_estimated: bool  # the optimizer had no state yet: its bytes follow from its type
    capture_bytes_per_s: float | None  # measured on a sample of the trainable parameters
    disk_bytes_per_s: float | None  # measured once on the spill folder (None: no folder, or it failed)
    host_available: int | None
    memory_cap: int  # recovery.snapshot_memory_mb in bytes
    world_size: int = 1
    probe_bytes: int | None = None  # the probe's basis and working vectors on the device
    device_free: int | None = None  # free device memory (None on a CPU: the host is the device)
    check_bytes_per_s: float | None = None  # the finite check of the parameters a scheduled snapshot makes

    @property
    def snapshot_bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes

    @property
    def capture_seconds(self) -> float | None:
        """The copy of the whole snapshot plus the finite check of its parameters."""
        if not self.capture_bytes_per_s:
            return None
        check = self.param_bytes / self.check_bytes_per_s if self.check_bytes_per_s else 0.0
        return self.snapshot_bytes / self.capture_bytes_per_s + check

    @property
    def spill_seconds(self) -> float | None:
        if not self.disk_bytes_per_s:
            return None
        return self.snapshot_bytes / self.disk_bytes_per_s

    @property
    def fits_host(self) -> bool:
        """Whether one snapshot fits in ``HOST_SHARE`` of the host's available memory (unknown: yes)."""
        return self.host_available is None or self.snapshot_bytes <= HOST_SHARE * self.host_available

    def in_memory(self) -> int:
        """Snapshots the ring keeps in memory before it spills (the newest always stays)."""
        return max(1, self.memory_cap // max(self.snapshot_bytes, 1))

    def seconds_per_snapshot(self, every: int, steps: int | None) -> float | None:
        """Capture plus, averaged over a run of ``steps``, the spills a snapshot every ``every``
        steps causes (each snapshot past what the ring holds in memory writes one to disk)."""
        cap = self.capture_seconds
        if cap is None:
            return None
        spill = self.spill_seconds
        if spill is None:
            return cap
        n = (steps // every) + 1 if steps and steps > 0 else math.inf
        spilled = max(0.0, n - self.in_memory()) / n if n != math.inf else 1.0
        return cap + spilled * spill

    def host_bytes(self, every: int, steps: int | None) -> int:
        """Host memory the snapshots of a run hold at most: those the ring keeps in memory, plus
        the newest while an older one is being written out (or dropped)."""
        n = (steps // every) + 1 if steps and steps > 0 else None
        held = self.in_memory() if n is None else min(n, self.in_memory())
        spilling = n is None or n > self.in_memory()
        return (held + (1 if spilling else 0)) * self.snapshot_bytes

    def rows(self, *, budget: float, user_every: int | None = None) -> list[tuple[str, str, bool, str]]:
        """The preflight table's rows for this cost (``cost_rows``): preflight words them
        without importing recovery."""
        return cost_rows(self, budget=budget, user_every=user_every)

    def summary(self) -> dict[str, Any]:
        return {
            "trainable_params": self.trainable_params,
            "param_bytes": self.param_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "optimizer_estimated": self.optimizer_estimated,
            "snapshot_bytes": self.snapshot_bytes,
            "capture_bytes_per_s": _round(self.capture_bytes_per_s),
            "check_bytes_per_s": _round(self.check_bytes_per_s),
            "capture_seconds": _round(self.capture_seconds, 4),
            "disk_bytes_per_s": _round(self.disk_bytes_per_s),
            "spill_seconds": _round(self.spill_seconds, 4),
            "host_available": self.host_available,
            "memory_cap": self.memory_cap,
            "world_size": self.world_size,
            "probe_bytes": self.probe_bytes,
            "device_free": self.device_free,
        }


@dataclass(frozen=True)
class Cadence:
    """How often snapshots are taken (``every`` None: only the run's first), why, and what it costs."""

    every: int | None
    reason: CadenceReason
    share: float | None  # predicted share of training time spent on snapshots
    seconds_per_snapshot: float | None
    step_seconds: float | None
    use_checkpoints: bool
    message: str

    def summary(self) -> dict[str, Any]:
        return {"every": self.every, "reason": self.reason.value, "share": _round(self.share, 5),
                "seconds_per_snapshot": _round(self.seconds_per_snapshot, 4),
                "step_seconds": _round(self.step_seconds, 4), "use_checkpoints": self.use_checkpoints,
                "message": self.message}


def choose_cadence(cost: SnapshotCost | None, *, step_seconds: float | None, budget: float, rollback_steps: int,
                   max_steps: int | None, save_every: int | None = None, user_every: int | None = None,
                   measured_seconds: float | None = None) -> Cadence:
    """Steps between snapshots that keep their cost within ``budget`` of training time.

    ``measured_seconds`` (a scheduled snapshot's measured cost, spill included) replaces the
    model's prediction when given. ``save_every``: the Trainer's checkpoint interval (None: it
    writes none during the run). A user's ``snapshot_every`` is kept as it is; its cost is
    still reported.
    """
    per = measured_seconds
    if user_every is not None:
        if per is None and cost is not None:
            per = cost.seconds_per_snapshot(user_every, max_steps)
        share = _share(per, user_every, step_seconds)
        return Cadence(user_every, CadenceReason.USER, share, per, step_seconds, False,
                       f"a snapshot every {user_every} steps (recovery.snapshot_every){_costs(share, per)}")
    if cost is not None and not cost.fits_host:
        msg = (f"no scheduled snapshots: one needs {_bytes(cost.snapshot_bytes)} and the host has "
               f"{_bytes(cost.host_available or 0)} available")
        return Cadence(None, CadenceReason.NO_ROOM, 0.0, None, step_seconds, save_every is not None,
                       msg + (f"; the Trainer's checkpoints (every {save_every} steps) are the rollback targets"
                              if save_every else "; set save_steps to give lossguard rollback targets"))
    if step_seconds is None or step_seconds <= 0 or (per is None and (cost is None or cost.capture_seconds is None)):
        return Cadence(DEFAULT_EVERY, CadenceReason.DEFAULT, None, per, step_seconds, False,
                       f"a snapshot every {DEFAULT_EVERY} steps (its cost is not known)")
    every = DEFAULT_EVERY
    for _ in range(4):  # the spill share depends on the cadence: settle it
        p = per if per is not None else cost.seconds_per_snapshot(every, max_steps)  # type: ignore[union-attr]
        assert p is not None
        need = max(DEFAULT_EVERY, math.ceil(p / (budget * step_seconds)))
        if need == every:
            break
        every = need
    p = per if per is not None else cost.seconds_per_snapshot(every, max_steps)  # type: ignore[union-attr]
    share = _share(p, every, step_seconds)
    if every == DEFAULT_EVERY:
        return Cadence(every, CadenceReason.DEFAULT, share, p, step_seconds, False,
                       f"a snapshot every {every} steps{_costs(share, p)}")
    coarse = every > max(rollback_steps, DEFAULT_EVERY)
    if not coarse:
        return Cadence(every, CadenceReason.BUDGET, share, p, step_seconds, False,
                       f"a snapshot every {every} steps to stay within {_pct(budget)} of training time{_costs(share, p)}")
    beyond = max_steps is not None and max_steps > 0 and every >= max_steps
    what = ("only the run's first snapshot" if beyond else f"a snapshot every {every} steps")
    base = f"{what}: to stay within {_pct(budget)} of training time{_costs(share, p)}"
    if save_every:
        return Cadence(every, CadenceReason.CHECKPOINTS, share, p, step_seconds, True,
                       f"{base}; the Trainer's checkpoints (every {save_every} steps) are rollback targets too")
    return Cadence(every, CadenceReason.COARSE, share, p, step_seconds, False,
                   f"{base}; a rollback may land up to {every + rollback_steps} steps before the onset "
                   f"(set save_steps to give lossguard closer targets, or raise recovery.snapshot_budget)")


def cost_line(cost: SnapshotCost | None, cadence: Cadence, *, probe_fraction: float | None = None) -> str:
    """One sentence: what recovery costs this run, in % of step time."""
    size = f"snapshots of {_bytes(cost.snapshot_bytes)}" if cost is not None else "snapshots"
    if cadence.share is None:
        head = f"recovery: {size}, cost not known ({cadence.message})"
    else:
        head = f"recovery costs {_pct(cadence.share)} of step time: {size}, {cadence.message}"
    if probe_fraction:
        head += f"; Hessian probes at most {probe_fraction:.0%} of training time"
    return head


def cost_rows(cost: SnapshotCost, *, budget: float, user_every: int | None = None,
              spill_dir: str | None = None) -> list[tuple[str, str, bool, str]]:
    """The cost model as preflight rows: (name, value, warn, advice)."""
    per_rank = " per rank" if cost.world_size > 1 else ""
    how = "estimated from the optimizer's type" if cost.optimizer_estimated else "as held"
    rows = [("snapshot size", f"{_bytes(cost.snapshot_bytes)}{per_rank}: trainable parameters "
             f"{_bytes(cost.param_bytes)} ({cost.trainable_params:,}) + optimizer state {_bytes(cost.optimizer_bytes)} "
             f"({how})", False, "")]
    cap = cost.capture_seconds
    rate = f"{_bytes(cost.capture_bytes_per_s)}/s" if cost.capture_bytes_per_s else "?"
    check = f", finite check at {_bytes(cost.check_bytes_per_s)}/s" if cost.check_bytes_per_s else ""
    rows.append(("snapshot copy", f"~{cap:.3g} s each (copy measured at {rate}{check})" if cap is not None
                 else "not measured", False, ""))
    room = f"{_bytes(cost.host_available)} available" if cost.host_available is not None else "unknown"
    held = cost.in_memory()
    rows.append(("host memory", f"{room}; {held} snapshot{'s' if held > 1 else ''} fit the in-memory cap "
                 f"({_bytes(cost.memory_cap)}), older ones spill to disk", not cost.fits_host,
                 "" if cost.fits_host else "one snapshot does not fit in half the available host memory: no "
                 "scheduled snapshots; the Trainer's checkpoints are the rollback targets"))
    spill = cost.spill_seconds
    where = f" ({spill_dir})" if spill_dir else ""
    rows.append(("spill disk", f"{_bytes(cost.disk_bytes_per_s)}/s measured{where}: ~{spill:.3g} s per spilled snapshot"
                 if spill is not None else "no spill folder measured", False, ""))
    if cost.probe_bytes is not None:
        free = cost.device_free if cost.device_free is not None else cost.host_available
        where = "device" if cost.device_free is not None else "host"
        tight = free is not None and cost.probe_bytes > 0.5 * free
        rows.append(("probe memory", f"basis and working vectors {_bytes(cost.probe_bytes)} (plus one micro-batch's "
                     f"graph, measured at the first probe) against {_bytes(free) if free is not None else '?'} free "
                     f"on the {where}", tight,
                     "the probe will keep no basis (the three-term recurrence) or skip as no_memory" if tight else ""))
    cadence = (f"every {user_every} steps (recovery.snapshot_every)" if user_every else
               f"chosen after the first steps are timed, to stay within {_pct(budget)} of training time")
    rows.append(("snapshot cadence", cadence, False, ""))
    return rows


def _share(per: float | None, every: int | None, step_seconds: float | None) -> float | None:
    if per is None or not every or not step_seconds or step_seconds <= 0:
        return None
    return per / (every * step_seconds)


def _costs(share: float | None, per: float | None) -> str:
    if per is None:
        return ""
    return f" ({per:.3g} s each)"


def _pct(share: float) -> str:
    return f"{100 * share:.3g}%" if share >= 1e-4 else "< 0.01%"


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _round(x: float | None, digits: int = 0) -> float | None:
    if x is None:
        return None
    return round(x, digits) if digits else float(round(x))

"""Carrying out recovery decisions on live training objects: snapshot, restore, LR override.

``Recoverer`` wraps a model, its optimizer and (optionally) its LR scheduler. It takes snapshots
into a ``SnapshotRing``, restores one in place (bitwise: parameters are ``copy_``-ed, optimizer
state reloaded from a clone), and scales the LR of each ``optimizer.step()``.

The LR override is exact for every scheduler: just before ``optimizer.step()`` each param group's
LR (which the scheduler has just set) is multiplied by the factor; just after, the scheduled value
is put back. The scheduler therefore never sees the override, and the LR used is
``factor * schedule(step)`` whatever the schedule (LambdaLR-based, ReduceLROnPlateau, chained).

What a rollback restores: parameters, optimizer state (moments and step counts), RNG states and
detector state. The scheduler's position keeps following the global step (the step counter
keeps counting forward); a metric-driven scheduler (ReduceLROnPlateau) has its state and the LRs
it chose restored from the snapshot, since the metrics it reacted to were rolled back too.

The safety net's head: at a rollback under trial, ``keep_head`` captures the state being
abandoned exactly as a snapshot is captured (kept apart from the ring, so no rollback ever picks
it as a target), in memory while the ring and it fit ``snapshot_memory_mb``, else spilled to
``<spill dir>/head``; ``revert_to_head`` puts it back the way ``restore`` puts a snapshot back.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lossguard.config import RecoveryConfig
from lossguard.recovery.budget import DEFAULT_EVERY, Cadence, CadenceReason, SnapshotCost, choose_cadence
from lossguard.recovery.sharding import local_tensor, reshard_optimizer_state
from lossguard.recovery.snapshot import (
    Capturer,
    Snapshot,
    SnapshotRing,
    clone_tree,
    load_snapshot,
    remove_stale,
    save_snapshot,
    set_rng_state,
    trainable_parameters,
    unwrap,
)

logger = logging.getLogger("lossguard")


def is_metric_driven(scheduler: Any) -> bool:
    """Whether ``scheduler`` sets the LR from metrics (ReduceLROnPlateau-like) rather than the step."""
    sched = unwrap(scheduler)
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return True
    return type(sched).__name__ in ("GreedyLR",)


class Recoverer:
    """Snapshots and restores one model/optimizer/scheduler triple; overrides the step's LR."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any = None, *,
                 config: RecoveryConfig | None = None, spill_dir: Any = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.config = config or RecoveryConfig()
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self._clock = clock
        # the caller's folder (one per DDP rank) wins over the configured one it was made from
        spill = spill_dir if spill_dir is not None else self.config.snapshot_dir
        if spill is not None:
            stale = remove_stale(Path(spill)) + remove_stale(Path(spill) / "head")
            if stale:
                logger.info("lossguard: removed %d snapshot(s) an earlier run left in %s", stale, spill)
        self.ring = SnapshotRing(self.config.snapshot_memory_mb, spill, self.config.snapshot_disk_keep)
        self.head: Snapshot | None = None  # the abandoned branch's head while a rollback is on trial
        self.capturer = Capturer(model, optimizer)
        self._opt = unwrap(optimizer) if optimizer is not None else None
        self._scheduled: list[float] | None = None
        self.snapshot_seconds = 0.0
        self.n_snapshots = 0
        self.last_rollback_seconds: float | None = None
        # the cadence: the user's, else DEFAULT_EVERY until the first steps have been timed
        self.every: int | None = self.config.snapshot_every or DEFAULT_EVERY
        self.cost: SnapshotCost | None = None
        self.cadence: Cadence | None = None
        self.step_times: deque[float] = deque(maxlen=256)
        self.capture_seconds: list[float] = []  # measured, scheduled snapshots with optimizer state
        self.spill_seconds: list[float] = []
        self._seen = (0, 0)  # measurements the cadence was chosen from

    def close(self) -> None:
        """Free the snapshots, in memory and on disk: they are scratch for this run only (a
        resumed run starts its own; the checkpoints lossguard pins are kept)."""
        self.ring.clear()
        self.drop_head()

    # --- snapshots -----------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        if self.cadence is not None and self.cadence.reason is CadenceReason.NO_ROOM:
            return False
        return not len(self.ring) or (self.every is not None and step % self.every == 0)

    def snapshot(self, step: int, engine_state: dict[str, Any] | bytes | None = None, *,
                 require_finite: bool = False) -> Snapshot | None:
        """Add a snapshot of ``step`` to the ring; with ``require_finite``, none (None) while a
        parameter is NaN or infinite: a damaged state is no rollback target."""
        if self.cadence is not None and self.cadence.reason is CadenceReason.NO_ROOM:
            return None  # one snapshot would not fit in host memory
        t0 = self._clock()
        snap = self.capturer.capture(step, self.scheduler, engine_state, require_finite=require_finite)
        t1 = self._clock()
        if snap is not None:
            spilled = self.ring.add(snap)
            self.n_snapshots += 1
            if self.cost is None or snap.nbytes >= 0.9 * self.cost.snapshot_bytes:  # optimizer state included
                self.capture_seconds.append(t1 - t0)
                if spilled:
                    self.spill_seconds.append((self._clock() - t1) / spilled)
        self.snapshot_seconds += self._clock() - t0
        return snap

    # --- the cadence ---------------------------------------------------------------------------
    CADENCE_STEPS = 6  # timed steps before the cadence is chosen (the first one is not counted)

    def observe_step(self, seconds: float | None) -> bool:
        """Note one optimizer step's time; True when the cadence should be chosen (again) now:
        after ``CADENCE_STEPS`` steps, then after each snapshot that measured a new cost."""
        if seconds is None or seconds <= 0 or self.config.snapshot_every is not None and self.cadence is not None:
            return False
        self.step_times.append(seconds)
        if self.cadence is None:
            return len(self.step_times) >= self.CADENCE_STEPS + 1
        return self.cadence.reason is not CadenceReason.NO_ROOM and self._measured_news()

    def _measured_news(self) -> bool:
        return (len(self.capture_seconds), len(self.spill_seconds)) != self._seen

    def step_seconds(self) -> float | None:
        """The median step time seen (the first step, with its warm-up, left out once there are others)."""
        times = list(self.step_times)
        if 1 < len(times) < (self.step_times.maxlen or 0):  # the first step is still among them
            times = times[1:]
        return _median(times) if times else None

    def measured_cost(self) -> SnapshotCost | None:
        """The cost model with its bandwidths replaced by what the snapshots so far measured."""
        cost = self.cost
        if cost is None:
            return None
        from dataclasses import replace

        size = cost.snapshot_bytes
        if self.capture_seconds:  # measured with the finite check in it
            cost = replace(cost, capture_bytes_per_s=size / max(_median(self.capture_seconds), 1e-9),
                           check_bytes_per_s=None)
        if self.spill_seconds:
            cost = replace(cost, disk_bytes_per_s=size / max(_median(self.spill_seconds), 1e-9))
        return cost

    def choose_cadence(self, *, max_steps: int | None, save_every: int | None) -> Cadence:
        """The cadence the budget allows now (from the measured cost once there is one); not yet applied."""
        return choose_cadence(self.measured_cost(), step_seconds=self.step_seconds(),
                              budget=self.config.snapshot_budget, rollback_steps=self.config.rollback_steps,
                              max_steps=max_steps, save_every=save_every, user_every=self.config.snapshot_every)

    def set_cost(self, cost: SnapshotCost | None) -> None:
        """The cost model measured at train begin; when one snapshot would not fit in host memory,
        no snapshot is taken from now on (not even the run's first)."""
        self.cost = cost
        if cost is not None and not cost.fits_host:
            self.set_cadence(self.choose_cadence(max_steps=None, save_every=None))

    def set_cadence(self, cadence: Cadence, every: int | None = None) -> None:
        """Apply ``cadence`` (``every`` overrides its step count: all DDP ranks must agree)."""
        self.cadence = cadence
        self.every = every if every is not None else cadence.every
        self._seen = (len(self.capture_seconds), len(self.spill_seconds))

    def params_finite(self) -> bool:
        return self.capturer.params_finite()

    # --- restore -------------------------------------------------------------------------------
    def restore(self, step: int) -> Snapshot:
        """Put the snapshot of ``step`` back in place; returns it (its ``engine`` state for the caller)."""
        t0 = self._clock()
        snap = self.ring.get(step)
        self._put_back(snap)
        self.ring.drop_after(step)
        self.last_rollback_seconds = self._clock() - t0
        return snap

    def load_weights(self, step: int) -> None:
        """Copy the trainable parameters of the snapshot of ``step`` into the model, and nothing
        else (optimizer state, RNGs and the ring untouched): for scoring it. Only with a head kept,
        which ``revert_to_head`` or a ``restore`` then replaces bitwise."""
        if self.head is None:
            raise RuntimeError("no head is kept: loading a snapshot's weights would lose the current ones")
        snap = self.ring.get(step)
        assert snap.params is not None
        self.capturer.fence()
        self.capturer.sharded_state()
        params = trainable_parameters(self.model)
        with torch.no_grad():
            for name, p in params.items():
                local_tensor(p).copy_(snap.params[name])  # a sharded parameter: this rank's shard

    def _put_back(self, snap: Snapshot) -> None:
        """Trainable parameters (pending gradients dropped), optimizer state and RNGs from ``snap``, bitwise."""
        assert snap.params is not None
        self.capturer.fence()
        self.capturer.refresh()
        self.capturer.sharded_state()
        params = trainable_parameters(self.model)
        missing = set(snap.params) ^ set(params)
        if missing:
            raise RuntimeError(f"snapshot of step {snap.step} does not match the model's trainable parameters "
                               f"({len(missing)} differ, e.g. {sorted(missing)[0]})")
        with torch.no_grad():
            for name, p in params.items():
                local_tensor(p).copy_(snap.params[name])  # a sharded parameter: this rank's shard, in place
                p.grad = None
        self._restore_optimizer(snap)
        if snap.rng is not None:
            set_rng_state(snap.rng)

    # --- the abandoned branch's head -----------------------------------------------------------
    def keep_head(self, step: int, engine_state: dict[str, Any] | bytes | None = None) -> Snapshot:
        """Keep the state about to be rolled back from (the trial's fallback), replacing any earlier head."""
        t0 = self._clock()
        self.drop_head()
        head = self.capturer.capture(step, self.scheduler, engine_state)
        assert head is not None
        spill = self.ring.spill_dir
        if spill is not None and self.ring.memory_nbytes() + head.nbytes > self.ring.memory_bytes:
            try:
                head.path = save_snapshot(head, spill / "head")
                head.params = head.optimizer = head.scheduler = head.rng = head.engine = None
            except Exception as err:  # OSError, or safetensors' SafetensorError on a full disk
                logger.warning("lossguard: cannot spill the abandoned head (%s: %s); keeping it in memory",
                               type(err).__name__, err)
        self.head = head
        self.snapshot_seconds += self._clock() - t0
        return head

    def drop_head(self) -> None:
        """Forget the head (the recovery was kept), in memory and on disk."""
        if self.head is not None and self.head.path is not None:
            shutil.rmtree(self.head.path, ignore_errors=True)
        self.head = None

    def revert_to_head(self, abandon_after: int) -> Snapshot:
        """Put the kept head back in place, bitwise, and forget the rejected branch's snapshots
        (those after ``abandon_after``, the rollback's target); returns the head (its ``engine``
        state for the caller)."""
        if self.head is None:
            raise RuntimeError("no abandoned head is kept: nothing to revert to")
        t0 = self._clock()
        head = load_snapshot(self.head.path) if self.head.on_disk and self.head.path is not None else self.head
        self._put_back(head)
        self.ring.drop_after(abandon_after)
        self.drop_head()
        self.last_rollback_seconds = self._clock() - t0
        return head

    def save_head(self, directory: Path) -> Path | None:
        """Write the kept head under ``directory`` (a checkpoint taken mid-trial carries it)."""
        if self.head is None:
            return None
        head = load_snapshot(self.head.path) if self.head.on_disk and self.head.path is not None else self.head
        return save_snapshot(head, directory)

    def load_head(self, path: Path) -> Snapshot:
        """Take the head a checkpoint carries (``save_head``) as this run's kept head."""
        head = load_snapshot(path)
        self.drop_head()
        self.head = Snapshot(head.step, head.params, head.optimizer, head.scheduler, head.rng, head.engine,
                             head.nbytes)
        return self.head

    def _restore_optimizer(self, snap: Snapshot) -> None:
        if self.optimizer is None or snap.optimizer is None:
            return
        opt = unwrap(self.optimizer)
        metric_driven = self.scheduler is not None and is_metric_driven(self.scheduler)
        scheduled = [g["lr"] for g in opt.param_groups]
        opt.load_state_dict(clone_tree(snap.optimizer))
        reshard_optimizer_state(opt)
        if self.config.reset_optimizer_moments:
            opt.state.clear()
        if metric_driven and snap.scheduler is not None:
            unwrap(self.scheduler).load_state_dict(clone_tree(snap.scheduler))
        else:
            for group, lr in zip(opt.param_groups, scheduled):
                group["lr"] = lr

    # --- LR override ---------------------------------------------------------------------------
    def scale_lr(self, multiplier: float) -> None:
        """Before ``optimizer.step()``: LR = multiplier x the scheduled LR (nothing to do at 1); the
        step waits (on the device) for snapshot copies still reading the state it changes."""
        self.capturer.fence()
        if multiplier == 1.0:
            self._scheduled = None
            return
        groups = self._opt.param_groups
        self._scheduled = [g["lr"] for g in groups]
        for g, lr in zip(groups, self._scheduled):
            g["lr"] = lr * multiplier

    def unscale_lr(self) -> None:
        """After ``optimizer.step()``: put the scheduled LR back, so the scheduler never sees the override."""
        if self._scheduled is None:
            return
        for g, lr in zip(self._opt.param_groups, self._scheduled):
            g["lr"] = lr
        self._scheduled = None

    def install_step_hooks(self, multiplier: Callable[[], float]) -> Callable[[], None]:
        """Apply the override around every ``optimizer.step()`` via torch's step hooks; returns an undo."""
        opt = self._opt

        def before(*_: Any) -> None:
            self.scale_lr(multiplier())

        def after(*_: Any) -> None:
            self.unscale_lr()

        pre = opt.register_step_pre_hook(before)
        post = opt.register_step_post_hook(after)

        def remove() -> None:
            pre.remove()
            post.remove()

        return remove


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]

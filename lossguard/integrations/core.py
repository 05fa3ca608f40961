"""What the Trainer callback (``LossGuard``) and the loop guard (``LoopGuard``) both do, once.

The two integrations differ in how they gather a step (wrapped Trainer methods, or the loss the
user hands over) and in how they tell training to save or stop (the Trainer's ``control`` flags,
or a returned ``StepResult``). Everything else is here: hooks that contain lossguard's own
failures (``contained``), the run's log and console notices (``Reporter``), the gradient norm read
from ``.grad`` (``grad_norm``), and carrying out the engine's ``Decision`` on the ``Recoverer``
(``carry_out``, ``apply_decision``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from lossguard.config import GuardConfig
from lossguard.integrations import dist
from lossguard.records import Action, ActionKind, Finding
from lossguard.recovery.apply import Recoverer
from lossguard.recovery.policy import Decision
from lossguard.recovery.sharding import any_sharded
from lossguard.recovery.sharding import grad_norm as sharded_grad_norm
from lossguard.telemetry.schema import EVENTS_FILE
from lossguard.telemetry.writer import EventWriter, set_aside

logger = logging.getLogger("lossguard")
F = TypeVar("F", bound=Callable[..., Any])


def contained(hook: F) -> F:
    """Run a framework hook (a method); on an internal error, warn once per distinct failure (see
    ``failure_key``) and let training go on. The owner keeps ``_failed_hooks`` (a set of those
    keys) and ``hook_seconds`` (time spent inside its hooks, for overhead figures); while its
    ``disabled`` is true (a second ``LossGuard`` on the same Trainer) the hook does nothing."""

    @functools.wraps(hook)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "disabled", False):
            return None
        t0 = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        except Exception as err:
            report_failure(self._failed_hooks, hook.__name__, err, "training continues")
            return None
        finally:
            self.hook_seconds += time.perf_counter() - t0

    return wrapper  # type: ignore[return-value]


#: distinct failures reported per owner; past this, one line says the rest go unreported
MAX_REPORTED_FAILURES = 20


def failure_key(where: str, err: BaseException) -> str:
    """What makes two failures "the same": where, the exception's type and its message with the
    numbers taken out (a step or a byte count differs from one step to the next)."""
    return f"{where}:{type(err).__name__}:{re.sub(r'[0-9]+', '#', str(err))[:200]}"


def report_failure(seen: set[str], where: str, err: BaseException, outcome: str) -> bool:
    """Log ``err`` (raised inside lossguard's ``where``) once per distinct failure; True when it was logged."""
    key = failure_key(where, err)
    if key in seen or len(seen) > MAX_REPORTED_FAILURES:
        return False
    seen.add(key)
    if len(seen) > MAX_REPORTED_FAILURES:
        logger.warning("lossguard: more than %d different internal failures; no more are reported", MAX_REPORTED_FAILURES)
        return False
    logger.warning("lossguard: %s failed (%s: %s); %s", where, type(err).__name__, err, outcome)
    return True


class Reporter:
    """The findings and actions of one run, written to ``events.jsonl`` and printed to the console.

    Only the main process (global rank 0) writes and prints; every rank keeps the lists, so that
    every rank knows what was decided.
    """

    def __init__(self, config: GuardConfig, *, is_main: bool = True) -> None:
        self.config = config
        self.is_main = is_main
        self.writer: EventWriter | None = None
        self.findings: list[Finding] = []
        self.actions: list[Action] = []

    def open(self, log_dir: str | os.PathLike[str], *, resumed: bool, background: bool = False) -> None:
        """Start writing ``<log_dir>/events.jsonl`` (main process only). A fresh run first sets an
        earlier run's log aside; a resumed one appends to its own."""
        if not self.is_main or self.writer is not None:
            return
        path = Path(log_dir) / EVENTS_FILE
        if not resumed:
            set_aside(path)
        self.writer = EventWriter(path, background=background)

    def write(self, kind: str, **fields: Any) -> None:
        if self.is_main and self.writer is not None:
            self.writer.write(kind, **fields)

    def write_record(self, record: dict[str, Any] | None) -> None:
        if record is not None and self.is_main and self.writer is not None:
            self.writer.write_record(record)

    def emit(self, item: Finding | Action) -> None:
        """Keep a finding or an action, write it to the log and print it."""
        finding = isinstance(item, Finding)
        (self.findings if finding else self.actions).append(item)  # type: ignore[arg-type]
        if not self.is_main:
            return
        if self.writer is not None:
            self.writer.write_record(item.to_record())
        if self.config.console:
            from lossguard.presentation.console import print_action, print_finding

            print_finding(item) if finding else print_action(item)  # type: ignore[arg-type]

    def write_refused(self) -> str | None:
        """Why the log cannot be written, when its disk has refused a write (else None)."""
        writer = self.writer
        if writer is None or not writer.failed:
            return None
        err = writer.error
        return f"{writer.path} refused a write ({err.strerror if err is not None and err.strerror else err})"

    def rollbacks(self) -> int:
        return sum(1 for a in self.actions if a.action is ActionKind.ROLLBACK)

    def close(self, step: int) -> None:
        """Write the ``end`` record, close the log (its queue drained) and say where it is."""
        self.write("end", step=step, findings=len(self.findings), actions=len(self.actions))
        if self.writer is not None:
            path = self.writer.path
            self.writer.close()
            self.writer = None
            if self.config.console:
                from lossguard.presentation.console import console, end_line

                console().print(end_line(path, step, len(self.findings), len(self.actions)), markup=False)


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """The global L2 norm of the parameters' gradients, as a tensor on their device (read it
    with ``float()`` where a wait costs nothing); None when no parameter has a gradient."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return None
    if any_sharded(grads):  # FSDP2: every rank holds a shard; the norm is over all of them
        return sharded_grad_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


@dataclass(frozen=True)
class Applied:
    """What ``apply_decision`` did, and what the integration must still ask of training."""

    rolled_back_to: int | None = None
    save: bool = False
    stop: bool = False


def carry_out(decision: Decision, report: Reporter, recoverer: Recoverer | None, engine: Any, step: int,
              judge: Callable[[], Any] | None = None) -> Applied:
    """Apply the decision (``apply_decision``), then report its findings and actions (a rollback's
    with the time its restore took; a declined one's finding as ``info``)."""
    done = apply_decision(decision, recoverer, engine, step, judge)
    for finding in decision.findings:
        report.emit(finding)
    for action in decision.actions:
        report.emit(action)
    return done


def apply_decision(decision: Decision, recoverer: Recoverer | None, engine: Any, step: int,
                   judge: Callable[[], Any] | None = None) -> Applied:
    """Carry out the engine's ``decision`` on the live training objects, after optimizer step
    ``step`` (the step whose weights a snapshot taken now holds).

    A rollback restores the snapshot's weights, optimizer state and RNGs, puts back the
    detectors' memory of that moment and records how long the restore took on the rollback
    action; one put on trial by the safety net first keeps the state it abandons (the head), and
    with a ``check_step`` first scores that snapshot's weights with ``judge`` (``precheck``): a
    rollback the policy then declines puts the head back and changes nothing else. A
    revert puts that head back the same way, then snapshots it (the rejected branch's snapshots
    are gone). Otherwise a snapshot is taken when the policy asks for one or one is due; a damaged
    state (a non-finite parameter) is never snapshotted. Saving and stopping are the caller's:
    the returned ``Applied`` says whether to.
    """
    rolled_back_to = None
    if recoverer is not None:
        if decision.drop_head:
            recoverer.drop_head()
        if decision.rollback_to is not None:
            if decision.keep_head:
                recoverer.keep_head(step, engine.frozen_detector_state() if engine is not None else None)
                if not _precheck(decision, recoverer, engine, judge, step):
                    return Applied()
            snap = recoverer.restore(decision.rollback_to)
            _restored(decision, ActionKind.ROLLBACK, snap, decision.rollback_to, recoverer, engine)
            rolled_back_to = decision.rollback_to
        elif decision.revert_to is not None and decision.abandon_after is not None:
            head = recoverer.revert_to_head(decision.abandon_after)
            _restored(decision, ActionKind.REVERT, head, head.step, recoverer, engine)
            recoverer.snapshot(step, engine.frozen_detector_state() if engine is not None else None,
                               require_finite=True)
        elif decision.snapshot or recoverer.due(step):
            state = engine.frozen_detector_state() if engine is not None else None
            recoverer.snapshot(step, state, require_finite=True)
    return Applied(rolled_back_to, decision.save, decision.stop)


def _precheck(decision: Decision, recoverer: Recoverer, engine: Any, judge: Callable[[], Any] | None,
              step: int) -> bool:
    """Score the weights of ``decision.check_step`` and ask the policy whether to go on with the
    rollback (True); a declined one gets the head back, bitwise. A failure to load or score, on
    any rank, goes on with the rollback unchecked, on every rank."""
    if decision.check_step is None or judge is None or engine is None:
        return True
    failed = False
    try:
        recoverer.load_weights(decision.check_step)
    except Exception as err:
        failed = True
        logger.warning("lossguard: could not load the snapshot of step %s to look before the rollback (%s: %s)",
                       decision.check_step, type(err).__name__, err)
    scores = None if dist.any_rank(failed) else judge()
    if engine.policy.checked(step, decision, scores):
        return True
    recoverer.revert_to_head(step)
    return False


def _restored(decision: Decision, kind: ActionKind, snap: Any, step: int, recoverer: Recoverer, engine: Any) -> None:
    """After a snapshot or head of ``step`` was put back: the detectors' memory of that moment,
    and the restore's time on the action that did it."""
    if snap.engine is not None and engine is not None:
        engine.load_detector_state(snap.engine, step)
    action = next((a for a in decision.actions if a.action is kind), None)
    if action is not None:
        action.details["restore_seconds"] = round(recoverer.last_rollback_seconds or 0.0, 6)


def pace_snapshots(recoverer: Recoverer | None, report: Reporter, step: int, seconds: float | None, *,
                   max_steps: int | None, save_every: int | None = None) -> None:
    """After optimizer step ``step`` took ``seconds``: once the first steps are timed (and again
    whenever a snapshot measured its own cost), choose how often to snapshot so that snapshots
    stay within ``recovery.snapshot_budget`` of training time; write the ``cost`` record and print
    what recovery costs this run. Every DDP rank takes the coarsest rank's cadence, so that all
    hold the same rollback targets."""
    if recoverer is None or not recoverer.observe_step(seconds):
        return
    from lossguard.recovery.budget import cost_line

    first = recoverer.cadence is None
    if not first and dist.is_distributed():
        return  # chosen once: a revision on one rank's measurement alone would split the ranks' targets
    cadence = recoverer.choose_cadence(max_steps=max_steps, save_every=save_every)
    every = dist.max_int(cadence.every or 0) or None if cadence.every is not None else None
    old = recoverer.every
    changed = (every is None) != (old is None) or (every is not None and old is not None
                                                   and abs(every - old) > 0.25 * old)
    recoverer.set_cadence(cadence, every)
    if not first and not changed:
        return
    line = cost_line(recoverer.cost, cadence, probe_fraction=report.config.probe.max_time_fraction
                     if report.config.probe.enabled else None)
    report.write("cost", step=step, revised=not first, every=every, cadence=cadence.summary(),
                 cost=recoverer.measured_cost().summary() if recoverer.cost is not None else None, line=line)
    if report.is_main and report.config.console:
        from lossguard.presentation.console import console

        console().print(f"lossguard: {line}", markup=False, highlight=False)


def measure_snapshot_cost(config: GuardConfig, model: Any, optimizer: Any, spill_dir: Path | None,
                          max_steps: int | None = None) -> Any:
    """The recovery cost model's measurements for this rank (``recovery.cost.measure_cost``); None
    when they failed (a warning says why)."""
    try:
        from lossguard.probes.hessian import free_memory
        from lossguard.probes.probe_cost import probe_memory
        from lossguard.recovery.cost import measure_cost

        vectors = config.probe.max_iter
        return measure_cost(model, optimizer, memory_mb=config.recovery.snapshot_memory_mb, spill_dir=spill_dir,
                            world_size=dist.world_size(), max_steps=max_steps, free_memory=free_memory,
                            probe_memory=lambda n: probe_memory(n, vectors=vectors).device_bytes)
    except Exception as err:
        logger.warning("lossguard: the recovery cost model is unavailable (%s: %s)", type(err).__name__, err)
        return None


"""Recovery inside a running ``transformers.Trainer``: snapshots, rollbacks, LR override, pinning.

``TrainerRecovery`` is what ``LossGuard`` delegates to when recovery is enabled. It keeps the
Trainer's own bookkeeping consistent: the global step keeps counting forward (the data loader
keeps moving), the scheduler keeps its position, the Trainer's logs go on.

Checkpoints: right after a rollback the Trainer is asked to save; that checkpoint holds the
restored pre-anomaly state and is kept (hard-linked, else copied) as
``<output_dir>/lossguard-fallback-<step>``, a name the Trainer's ``save_total_limit`` rotation
(which globs ``checkpoint-*``) never deletes, while the ``checkpoint-*`` itself stays for
``resume_from_checkpoint=True``. After the LR is restored the Trainer is asked to save again. No
save is asked for when the disk has just refused a write, and a save lossguard asked for that
fails does not stop training (``hf_saves``). Every checkpoint also gets ``lossguard_state.json``
(detector and policy state), written before the Trainer's own files and read back by
``trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Any

from lossguard.config import GuardConfig
from lossguard.inspection import FALLBACK_NOTE, FALLBACK_PREFIX
from lossguard.integrations import dist
from lossguard.integrations.core import Applied, Reporter, measure_snapshot_cost, pace_snapshots
from lossguard.integrations.hf_saves import SaveGuard, disk_refusal
from lossguard.records import Action, ActionKind
from lossguard.recovery.apply import Recoverer
from lossguard.recovery.budget import SnapshotCost
from lossguard.telemetry.resume_scan import ResumeScan

logger = logging.getLogger("lossguard")

STATE_FILE = "lossguard_state.json"
TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME
HEAD_DIR = "lossguard_head"  # a checkpoint taken while a rollback is on trial: the head it may revert to


def resumed_checkpoint(args: Any, state: Any) -> Path | None:
    """The checkpoint ``trainer.train(resume_from_checkpoint=...)`` resumed this run from, if any.

    The Trainer keeps no record of that path, only the ``TrainerState`` it loaded from the
    checkpoint's ``trainer_state.json``, which on_train_begin receives. So the checkpoint is the
    folder whose saved state is that one (same global step, same log history): among
    ``args.resume_from_checkpoint``, ``checkpoint-<step>`` and lossguard's pinned fallbacks in
    ``output_dir``. A checkpoint from elsewhere (another run's output_dir) is only named in
    ``train()``'s own argument, read from the call stack as a last resort.
    """
    step = int(state.global_step)
    if step <= 0:
        return None
    out = Path(args.output_dir)
    named = getattr(args, "resume_from_checkpoint", None)
    candidates = [Path(named)] if isinstance(named, (str, os.PathLike)) else []
    candidates += [out / f"checkpoint-{step}", *sorted(out.glob(f"{FALLBACK_PREFIX}*"))]
    for path in candidates:
        if _holds_state(path, state):
            return path
    path = _train_argument()
    return path if path is not None and _holds_state(path, state) else None


def _holds_state(path: Path, state: Any) -> bool:
    """Whether the Trainer state saved in checkpoint ``path`` is the one ``state`` was loaded from."""
    try:
        saved = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    # as JSON text: a NaN in the log history (a NaN grad norm logged) is not equal to itself
    return (saved.get("global_step") == state.global_step
            and json.dumps(saved.get("log_history")) == json.dumps(state.log_history))


def snapshot_cost(config: GuardConfig, log_dir: Path, trainer: Any, model: Any, optimizer: Any,
                  max_steps: int | None = None) -> SnapshotCost | None:
    """What one snapshot of this rank's trainable state costs, measured once at train begin."""
    if not config.recovery.enabled or model is None:
        return None
    return measure_snapshot_cost(config, model, getattr(trainer, "optimizer", None) or optimizer,
                                 dist.snapshot_folder(config.recovery.snapshot_dir, log_dir), max_steps)


def save_interval(args: Any, max_steps: int | None) -> int | None:
    """Steps between the Trainer's checkpoints (``save_strategy='steps'``), else None."""
    strategy = getattr(getattr(args, "save_strategy", None), "value", getattr(args, "save_strategy", None))
    if strategy != "steps":
        return None
    value = float(getattr(args, "save_steps", 0) or 0)
    if value <= 0:
        return None
    if value < 1:
        return max(1, int(value * max_steps + 0.999)) if max_steps else None
    return int(value)


def _train_argument(max_depth: int = 12) -> Path | None:
    frame = inspect.currentframe()
    depth = 0
    while frame is not None and depth < max_depth:
        value = frame.f_locals.get("resume_from_checkpoint")
        if isinstance(value, (str, os.PathLike)) and Path(value).is_dir():
            return Path(value)
        frame = frame.f_back
        depth += 1
    return None


class TrainerRecovery:
    """Applies the engine's recovery decisions to the Trainer's model, optimizer and scheduler."""

    def __init__(self, config: GuardConfig, log_dir: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.recoverer: Recoverer | None = None
        self.pin_target: tuple[int, int] | None = None  # (rollback target, step of the save that holds it)
        self.pinned: list[Path] = []
        self.engine: Any = None
        self.is_main = True
        self.saves = SaveGuard(self._before_save, self._save_failed)
        self._state_written: Path | None = None  # the checkpoint whose lossguard state is already in
        self._refusals: set[str] = set()
        self.save_error: str | None = None  # a save lossguard asked for failed: it asks for none again
        self._first_snapshot_due = False

    def steps(self) -> tuple[int, ...]:
        return self.recoverer.ring.steps() if self.recoverer is not None else ()

    def begin(self, trainer: Any, model: Any, optimizer: Any, scheduler: Any, *, engine: Any = None,
              is_main: bool = True, cost: SnapshotCost | None = None) -> None:
        self.engine, self.is_main = engine, is_main
        self.saves.install(trainer)
        optimizer = getattr(trainer, "optimizer", None) or optimizer
        scheduler = getattr(trainer, "lr_scheduler", None) or scheduler
        if optimizer is None:
            logger.warning("lossguard: no optimizer found; recovery is off for this run")
            return
        self.recoverer = Recoverer(model, optimizer, scheduler, config=self.config.recovery,
                                   spill_dir=dist.snapshot_folder(self.config.recovery.snapshot_dir, self.log_dir))
        self.recoverer.set_cost(cost)
        self._first_snapshot_due = True

    def observe_step(self, args: Any, state: Any, seconds: float | None, report: Reporter) -> None:
        """After each optimizer step: the snapshot cadence, once the first steps are timed."""
        max_steps = int(state.max_steps) or None
        pace_snapshots(self.recoverer, report, int(state.global_step), seconds, max_steps=max_steps,
                       save_every=save_interval(args, max_steps))

    def end(self) -> None:
        """At train end: the snapshots are scratch for this run (in memory and spilled)."""
        self.saves.uninstall()
        if self.recoverer is not None:
            self.recoverer.close()

    def due(self, step: int) -> bool:
        """Whether a scheduled snapshot follows optimizer step ``step``."""
        return self.recoverer is not None and self.recoverer.due(step)

    def pre_optimizer_step(self, engine: Any, global_step: int) -> None:
        """Before the optimizer step after ``global_step``: the run's first snapshot (here, not at
        train begin: a resumed run's optimizer state and RNGs are loaded after it), then the
        step's LR override."""
        rec = self.recoverer
        if rec is None:
            return
        if self._first_snapshot_due:
            if not len(rec.ring):
                rec.snapshot(global_step, engine.frozen_detector_state() if engine is not None else None)
            self._first_snapshot_due = False
        if engine is not None:
            rec.scale_lr(engine.lr_multiplier(global_step + 1))

    def post_optimizer_step(self) -> None:
        if self.recoverer is not None:
            self.recoverer.unscale_lr()

    def applied(self, done: Applied, control: Any, step: int, output_dir: str, refused: str | None = None) -> None:
        """After ``core.carry_out``: ask the Trainer to save or stop, and remember a rollback's
        target, whose checkpoint (this step's save) gets pinned.

        No save is asked for when the disk has just refused a write (``refused``: the log's or a
        snapshot spill's failure) or refuses a test write now: the Trainer's save would raise into
        training. One line says so; the recovered state then lives in memory only.
        """
        rec = self.recoverer
        if rec is None:  # recovery is off: nothing was carried out
            return
        if done.rolled_back_to is not None:
            self.pin_target = (done.rolled_back_to, step)
        if done.save:
            why = disk_refusal(output_dir, rec.ring.newest_nbytes() + 2**20, refused=refused or rec.ring.spill_error or self.save_error)
            if dist.any_rank(why is not None) and why is None:  # every rank asks, or none does
                why = "another rank's disk refused a write"
            if why is None:
                control.should_save = True
                self.saves.requested_at = step
            else:
                self.pin_target = None
                if why not in self._refusals:
                    self._refusals.add(why)
                    logger.warning("lossguard: no checkpoint asked for at step %d: %s; the recovered state is kept "
                                   "in memory only (training continues)", step, why)
        if done.stop:
            control.should_training_stop = True

    def _before_save(self, ckpt: Path) -> None:
        """Into a checkpoint folder, before the Trainer writes its files: lossguard's state."""
        if not self.is_main or self.engine is None:
            return
        ckpt.mkdir(parents=True, exist_ok=True)
        _write_state(ckpt, self.engine)
        self._state_written = ckpt

    def _save_failed(self, step: int, ckpt: Path, err: BaseException) -> None:
        self.pin_target = None
        self._state_written = None
        self.save_error = f"the checkpoint it asked for at step {step} failed ({type(err).__name__})"
        logger.warning("lossguard: the checkpoint lossguard asked for at step %d could not be written (%s: %s); "
                       "its partial folder %s was removed, training continues with the recovered state in "
                       "memory only, and lossguard asks for no more checkpoints in this run",
                       step, type(err).__name__, err, ckpt.name)

    def on_save(self, args: Any, state: Any, engine: Any, is_main: bool) -> list[Action]:
        """Write lossguard's state into the new checkpoint (unless it went in before the Trainer's
        files) and, while a rollback is on trial, each rank's abandoned head; pin it when it holds
        a rollback target."""
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self._save_head(ckpt)
        written, self._state_written = self._state_written, None
        pin, step = self.pin_target, int(state.global_step)
        if pin is not None and pin[1] <= step:
            self.pin_target = None  # pinned now, or its save never came (it failed, or was not asked for)
        if not is_main or not ckpt.is_dir():
            return []
        if engine is not None and written != ckpt:
            _write_state(ckpt, engine)
        self._offer_checkpoint(ckpt, step)
        if pin is None or pin[1] != step:
            return []
        target = pin[0]
        pinned = _fallback_path(Path(args.output_dir), step)
        how = _pin(ckpt, pinned)
        message = (f"kept the checkpoint of step {step} as {pinned.name}, safe from save_total_limit rotation: it "
                   f"holds the state of step {target} that the rollback restored (resume from it with "
                   f"resume_from_checkpoint)")
        (pinned / FALLBACK_NOTE).write_text(json.dumps({"step": step, "restored_from_step": target,
                                                        "message": message}))
        self.pinned.append(pinned)
        return [Action(ActionKind.SAVE, step, message, from_step=target, to_step=step,
                       details={"path": str(pinned), "pinned_by": how})]

    def _offer_checkpoint(self, ckpt: Path, step: int) -> None:
        """Where snapshots are too costly to land near an onset (``Cadence.use_checkpoints``), the
        Trainer's new checkpoint becomes a rollback target (``recovery.checkpoint_target``)."""
        rec = self.recoverer
        if (rec is None or rec.cadence is None or not rec.cadence.use_checkpoints or rec.ring.spill_dir is None
                or dist.is_distributed() or step in rec.ring):
            return
        from lossguard.recovery import checkpoint_target
        from lossguard.recovery.snapshot import trainable_parameters

        rec.ring.loaders["checkpoint"] = checkpoint_target.load
        snap = checkpoint_target.pin(ckpt, rec.ring.spill_dir, step, list(trainable_parameters(rec.model)))
        if snap is not None:
            rec.ring.add(snap)

    def load_resumed(self, args: Any, state: Any, engine: Any, report: Reporter,
                     scan: ResumeScan | None = None) -> Path | None:
        """On ``resume_from_checkpoint``, load lossguard's state saved in that checkpoint and log
        the ``resume``; the checkpoint.

        Two things are said in one line each: a checkpoint without lossguard's state (detection
        and recovery start afresh; the rollbacks already spent, read from the log, still count),
        and a checkpoint inside a stretch lossguard had abandoned (rolled back from), with where
        the recovered state is.
        """
        step = int(state.global_step)
        if engine is None or step <= 0:
            return None
        ckpt = resumed_checkpoint(args, state)
        fields: dict[str, Any] = {}
        name = ckpt.name if ckpt is not None else f"the checkpoint of step {step}"
        if ckpt is not None and (ckpt / STATE_FILE).is_file():
            engine.load_state_dict(json.loads((ckpt / STATE_FILE).read_text()))
        else:
            fields["state"] = "missing"
            # only rank 0 read the log (the others count 0): every rank must count the same budget
            engine.policy.rollbacks = max(engine.policy.rollbacks, dist.max_int(scan.rollbacks if scan else 0))
            low = f"; the log shows the LR at {scan.low_lr['lr_factor']} x schedule since step " \
                  f"{scan.low_lr['step']}, this run resumes at the full schedule" if scan and scan.low_lr else ""
            if report.is_main:
                logger.warning("lossguard: %s holds no %s (saved without lossguard, or interrupted before lossguard's "
                               "state was written): detection and recovery start afresh at step %d%s%s", name,
                               STATE_FILE, step, f", with the {scan.rollbacks} rollback(s) the log shows counted"
                               if scan and scan.rollbacks else "", low)
        if scan is not None and scan.abandoned is not None:
            fields["abandoned"] = scan.abandoned
            logger.warning("lossguard: %s", _abandoned_message(Path(args.output_dir), name, step, scan.abandoned))
        report.write("resume", step=step, checkpoint=None if ckpt is None else str(ckpt),
                     rollbacks=engine.policy.rollbacks, phase=engine.policy.phase.value, **fields)
        if ckpt is not None and engine.policy.judging and not self._load_head(ckpt):
            for action in engine.policy.unjudged(step, f"{ckpt.name} holds no abandoned head").actions:
                report.emit(action)
        return ckpt

    def _save_head(self, ckpt: Path) -> None:
        rec = self.recoverer
        if rec is None or rec.head is None:
            return
        try:
            if ckpt.is_dir():
                rec.save_head(dist.rank_path(ckpt / HEAD_DIR))
        except OSError as err:
            logger.warning("lossguard: the abandoned head was not saved into %s (%s)", ckpt, err)
        if dist.is_distributed():  # every rank's head is in before rank 0 may move the folder (pinning)
            dist.barrier()

    def _load_head(self, ckpt: Path) -> bool:
        folder = dist.rank_path(ckpt / HEAD_DIR)
        heads = sorted(folder.glob("step-*")) if folder.is_dir() else []
        if self.recoverer is None or not heads:
            return False
        self.recoverer.load_head(heads[-1])
        return True


def _abandoned_message(output_dir: Path, name: str, step: int, abandoned: dict[str, Any]) -> str:
    """One line: the resumed state is one lossguard had thrown away, and where the recovered one is."""
    at, to = abandoned["step"], abandoned["to_step"]
    recovered = [p.name for p in (output_dir / f"checkpoint-{at}",) if p.is_dir()]
    recovered += sorted(p.name for p in output_dir.glob(f"{FALLBACK_PREFIX}{at}") if p.is_dir())
    recovered += sorted(p.name for p in output_dir.glob(f"{FALLBACK_PREFIX}{at}-*") if p.is_dir())
    where = (f"resume from {' or '.join(recovered)} to continue the recovered run" if recovered else
             "no checkpoint of the recovered state was saved (the run ended first); the trouble may come "
             "back, and lossguard will act on it again")
    return (f"resuming at step {step} from {name}, a state lossguard had abandoned: at step {at} it "
            f"{'rolled back' if abandoned.get('action') == 'rollback' else 'reverted'} to step {to}"
            f"{' (' + str(abandoned['reason']) + ')' if abandoned.get('reason') else ''}; {where}")


def _write_state(ckpt: Path, engine: Any) -> None:
    tmp = ckpt / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(engine.state_dict(), default=_jsonable))
    os.replace(tmp, ckpt / STATE_FILE)


def _pin(ckpt: Path, pinned: Path) -> str:
    """Keep checkpoint ``ckpt`` as ``pinned``; how: "link" (hard links: no extra space), "copy", or
    "move" when the disk takes neither. Linked or copied, ``ckpt`` stays a ``checkpoint-*`` that
    ``resume_from_checkpoint=True`` finds (with ``save_total_limit=1``, the rotation has just
    deleted every other one)."""
    for how, copy in (("link", os.link), ("copy", shutil.copy2)):
        try:
            shutil.copytree(ckpt, pinned, copy_function=copy)
            return how
        except OSError:
            shutil.rmtree(pinned, ignore_errors=True)
    os.replace(ckpt, pinned)
    return "move"


def _fallback_path(output_dir: Path, step: int) -> Path:
    """A free name for the pinned checkpoint saved at ``step`` (its trainer_state.json says that
    step too): an earlier run in the same output_dir may have taken the plain one."""
    path = output_dir / f"{FALLBACK_PREFIX}{step}"
    n = 2
    while path.exists():
        path = output_dir / f"{FALLBACK_PREFIX}{step}-{n}"
        n += 1
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple, deque)):
        return list(value)
    return str(value)

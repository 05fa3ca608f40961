"""Recovery inside a running ``transformers.Trainer``: snapshots, rollbacks, LR override, pinning.

``TrainerRecovery`` is what ``LossGuard`` delegates to when recovery is enabled. It keeps the
Trainer's own bookkeeping consistent: the global step keeps counting forward (the data loader
keeps moving), the scheduler keeps its position, the Trainer's logs go on.

Checkpoints: right after a rollback the Trainer is asked to save; that checkpoint holds the
restored pre-anomaly state and is moved to ``<output_dir>/lossguard-fallback-<step>``, a name the
Trainer's ``save_total_limit`` rotation (which globs ``checkpoint-*``) never deletes. After the LR
is restored the Trainer is asked to save again. Every checkpoint also gets ``lossguard_state.json``
(detector and policy state), read back by ``trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

from lossguard.config import GuardConfig
from lossguard.integrations import dist
from lossguard.records import Action, ActionKind
from lossguard.recovery.apply import Recoverer
from lossguard.recovery.policy import Decision

logger = logging.getLogger("lossguard")

STATE_FILE = "lossguard_state.json"
FALLBACK_PREFIX = "lossguard-fallback-"


def resume_checkpoint(output_dir: str, global_step: int, max_depth: int = 12) -> Path | None:
    """The checkpoint ``trainer.train(resume_from_checkpoint=...)`` is resuming from, if any."""
    frame = inspect.currentframe()
    depth = 0
    while frame is not None and depth < max_depth:
        value = frame.f_locals.get("resume_from_checkpoint")
        if isinstance(value, (str, os.PathLike)) and Path(value).is_dir():
            return Path(value)
        frame = frame.f_back
        depth += 1
    guess = Path(output_dir) / f"checkpoint-{global_step}"
    return guess if global_step > 0 and guess.is_dir() else None


class TrainerRecovery:
    """Applies the engine's recovery decisions to the Trainer's model, optimizer and scheduler."""

    def __init__(self, config: GuardConfig, log_dir: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.recoverer: Recoverer | None = None
        self.pin_target: int | None = None
        self.pinned: list[Path] = []

    def steps(self) -> tuple[int, ...]:
        return self.recoverer.ring.steps() if self.recoverer is not None else ()

    def begin(self, trainer: Any, model: Any, optimizer: Any, scheduler: Any) -> None:
        optimizer = getattr(trainer, "optimizer", None) or optimizer
        scheduler = getattr(trainer, "lr_scheduler", None) or scheduler
        if optimizer is None:
            logger.warning("lossguard: no optimizer found; recovery is off for this run")
            return
        self.recoverer = Recoverer(model, optimizer, scheduler, config=self.config.recovery,
                                   spill_dir=dist.snapshot_folder(self.config.recovery.snapshot_dir, self.log_dir))

    def end(self) -> None:
        """At train end: the snapshots are scratch for this run (in memory and spilled)."""
        if self.recoverer is not None:
            self.recoverer.close()

    def due(self, step: int) -> bool:
        """Whether a scheduled snapshot follows optimizer step ``step``."""
        return self.recoverer is not None and self.recoverer.due(step)

    def first_snapshot(self, step: int, engine: Any) -> None:
        if self.recoverer is not None and not len(self.recoverer.ring):
            self.recoverer.snapshot(step, engine.frozen_detector_state() if engine is not None else None)

    def pre_optimizer_step(self, engine: Any, next_step: int) -> None:
        if self.recoverer is not None and engine is not None:
            self.recoverer.scale_lr(engine.lr_multiplier(next_step))

    def post_optimizer_step(self) -> None:
        if self.recoverer is not None:
            self.recoverer.unscale_lr()

    def apply(self, decision: Decision, engine: Any, step: int, control: Any) -> None:
        """Carry out ``decision`` after optimizer step ``step``."""
        rec = self.recoverer
        if rec is None:
            return
        if decision.rollback_to is not None:
            snap = rec.restore(decision.rollback_to)
            if snap.engine is not None and engine is not None:
                engine.load_detector_state(snap.engine, decision.rollback_to)
            if decision.actions and decision.actions[0].action is ActionKind.ROLLBACK:
                decision.actions[0].details["restore_seconds"] = round(rec.last_rollback_seconds or 0.0, 6)
            self.pin_target = decision.rollback_to
        elif decision.snapshot or rec.due(step):
            rec.snapshot(step, engine.frozen_detector_state() if engine is not None else None, require_finite=True)
        if decision.save:
            control.should_save = True
        if decision.stop:
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, engine: Any, is_main: bool) -> list[Action]:
        """Write lossguard's state into the new checkpoint; pin it when it holds a rollback target."""
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not is_main or not ckpt.is_dir():
            return []
        if engine is not None:
            tmp = ckpt / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(engine.state_dict(), default=_jsonable))
            os.replace(tmp, ckpt / STATE_FILE)
        if self.pin_target is None:
            return []
        target, self.pin_target = self.pin_target, None
        pinned = _fallback_path(Path(args.output_dir), target, int(state.global_step))
        os.replace(ckpt, pinned)
        self.pinned.append(pinned)
        return [Action(ActionKind.SAVE, int(state.global_step),
                       f"kept the restored state of step {target} as {pinned.name}, safe from save_total_limit "
                       f"rotation (resume from it with resume_from_checkpoint)", to_step=target,
                       details={"path": str(pinned)})]

    def load_resumed(self, args: Any, state: Any, engine: Any) -> Path | None:
        """On ``resume_from_checkpoint``, load lossguard's state saved in that checkpoint."""
        if engine is None or int(state.global_step) <= 0:
            return None
        ckpt = resume_checkpoint(args.output_dir, int(state.global_step))
        if ckpt is None or not (ckpt / STATE_FILE).is_file():
            return None
        engine.load_state_dict(json.loads((ckpt / STATE_FILE).read_text()))
        return ckpt


def _fallback_path(output_dir: Path, target: int, step: int) -> Path:
    """A free name for the pinned checkpoint of ``target``, saved at ``step``: an earlier run in
    the same output_dir (or an earlier relapse) may have taken the plain one."""
    path = output_dir / f"{FALLBACK_PREFIX}{target}"
    if not path.exists():
        return path
    path = output_dir / f"{FALLBACK_PREFIX}{target}-at-{step}"
    n = 2
    while path.exists():
        path = output_dir / f"{FALLBACK_PREFIX}{target}-at-{step}-{n}"
        n += 1
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple, deque)):
        return list(value)
    return str(value)

"""The Trainer's checkpoint saves as lossguard sees them: its state written first, its own requests contained.

``SaveGuard`` wraps ``Trainer._save_checkpoint`` of the running Trainer instance for the duration
of ``train()`` (as ``StepCapture`` wraps ``training_step``), for two reasons:

- ``lossguard_state.json`` goes into the checkpoint folder *before* the Trainer writes anything,
  so a checkpoint that has ``trainer_state.json`` (what makes it resumable) always has lossguard's
  state too. Written in ``on_save``, after the Trainer's files, a kill in between left a
  checkpoint that resumed with fresh detectors and the full LR in the middle of a recovery.
- A save that lossguard asked for (after a rollback, after the LR is restored) and the Trainer's
  own schedule did not must not take the training down: when it fails (a full or read-only
  disk: ``OSError``, or ``SafetensorError`` from safetensors) the half-written folder is removed,
  one warning says so, and training goes on. A save the user's ``save_strategy`` asked for fails
  exactly as it would without lossguard.

``disk_refusal`` is the check made before asking for a save at all: the log or a snapshot spill
just failed, the output folder takes no file, or it has less room than a checkpoint needs.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("lossguard")

PROBE_NAME = ".lossguard-write-test"


def scheduled_save(args: Any, state: Any) -> bool:
    """Whether the Trainer's own ``save_strategy`` saves after this step (as ``DefaultFlowCallback`` decides)."""
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    step = int(state.global_step)
    if strategy != "steps":
        return False
    every = getattr(state, "save_steps", 0) or getattr(args, "save_steps", 0)
    return (every > 0 and step % every == 0) or step >= int(state.max_steps)


def disk_refusal(output_dir: str | os.PathLike[str], needed_bytes: int, *, refused: str | None = None) -> str | None:
    """Why a checkpoint save into ``output_dir`` would fail now, or None when nothing says so.

    ``refused``: a write lossguard itself just saw fail (its log, a snapshot spill). Otherwise a
    small file is written and removed, and the free space is compared with ``needed_bytes``.
    """
    if refused is not None:
        return refused
    out = Path(output_dir)
    probe = out / f"{PROBE_NAME}-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        return f"{out} refused a test write ({err.strerror or err})"
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    try:
        st = os.statvfs(out)
    except (OSError, AttributeError):
        return None
    free = st.f_bavail * st.f_frsize
    if free < needed_bytes:
        return f"{out} has {free / 2**20:.1f} MB free, a checkpoint needs about {needed_bytes / 2**20:.1f} MB"
    return None


def unshare(folder: Path) -> None:
    """Unlink the files of ``folder`` that are hard links (shared with a pinned fallback), before
    the Trainer writes into that folder again (a later run in the same output_dir reaching the
    same step): it rewrites files in place, which would change the pinned copy too."""
    for f in folder.rglob("*"):
        try:
            if f.is_file() and not f.is_symlink() and f.stat().st_nlink > 1:
                f.unlink()
        except OSError:
            pass


class SaveGuard:
    """Wraps one Trainer's ``_save_checkpoint`` for one ``train()`` call.

    Args:
        before: called with the checkpoint folder before the Trainer writes into it.
        on_failure: called with (step, folder, error) when a save lossguard asked for failed.
    """

    def __init__(self, before: Callable[[Path], None], on_failure: Callable[[int, Path, BaseException], None]) -> None:
        self._before = before
        self._on_failure = on_failure
        self.requested_at: int | None = None  # the step after which lossguard asked for a save
        self._trainer: Any = None
        self._failed: set[str] = set()

    def install(self, trainer: Any) -> bool:
        if trainer is None or not callable(getattr(trainer, "_save_checkpoint", None)) or self._trainer is not None:
            return False
        original = trainer._save_checkpoint

        def save_checkpoint(model: Any, trial: Any, *args: Any, **kwargs: Any) -> Any:
            return self._save(original, trainer, model, trial, *args, **kwargs)

        trainer._save_checkpoint = save_checkpoint
        self._trainer = trainer
        return True

    def uninstall(self) -> None:
        trainer, self._trainer = self._trainer, None
        if trainer is not None and "_save_checkpoint" in vars(trainer):
            del trainer._save_checkpoint

    def _save(self, original: Callable[..., Any], trainer: Any, model: Any, trial: Any, *args: Any, **kwargs: Any) -> Any:
        state = trainer.state
        step = int(state.global_step)
        ours = self.requested_at == step and not scheduled_save(trainer.args, state)
        self.requested_at = None
        try:
            folder = Path(trainer._get_output_dir(trial=trial)) / f"checkpoint-{step}"
        except Exception:
            folder = Path(trainer.args.output_dir) / f"checkpoint-{step}"
        existed = folder.exists()
        try:
            if existed:
                unshare(folder)
            self._before(folder)
        except Exception as err:
            from lossguard.integrations.core import report_failure

            report_failure(self._failed, "writing lossguard's state into the checkpoint", err, "training continues")
        if not ours:
            return original(model, trial, *args, **kwargs)
        try:
            return original(model, trial, *args, **kwargs)
        except Exception as err:  # our own request must never take the training down
            if not existed:
                shutil.rmtree(folder, ignore_errors=True)
            self._on_failure(step, folder, err)
            return None

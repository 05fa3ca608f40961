"""``LossGuard``: the Hugging Face ``TrainerCallback``, a thin adapter around the engine.

``Trainer(..., callbacks=[LossGuard()])`` records every optimizer step into
``<output_dir>/lossguard/events.jsonl``, runs the detectors on it and reports findings as they
happen. Every hook is guarded: a failure inside lossguard logs one warning and training goes on.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from transformers import TrainerCallback

from lossguard.config import GuardConfig
from lossguard.integrations import dist
from lossguard.integrations.hf_recovery import TrainerRecovery
from lossguard.integrations.step_capture import StepCapture, find_trainer
from lossguard.records import Action, Finding, Sample
from lossguard.telemetry.schema import EVENTS_FILE
from lossguard.telemetry.writer import EventWriter

logger = logging.getLogger("lossguard")
F = TypeVar("F", bound=Callable[..., Any])


def _guarded(hook: F) -> F:
    """Run a callback hook; on an internal error, warn once per hook and let training go on."""

    @functools.wraps(hook)
    def wrapper(self: LossGuard, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        except Exception as err:
            if hook.__name__ not in self._failed_hooks:
                self._failed_hooks.add(hook.__name__)
                logger.warning("lossguard: %s failed (%s: %s); training continues",
                               hook.__name__, type(err).__name__, err)
            return None
        finally:
            self.hook_seconds += time.perf_counter() - t0

    return wrapper  # type: ignore[return-value]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("lossguard", "torch", "transformers", "peft", "accelerate"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except ImportError:
                continue
        out[name] = str(getattr(mod, "__version__", "?"))
    return out


def _param_counts(model: Any) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


class LossGuard(TrainerCallback):
    """Records, diagnoses and (with recovery enabled) repairs a Trainer run.

    Args:
        config: a ``GuardConfig``; keyword sections (``detection={...}``, ``recovery={...}``)
            build one. Invalid values raise ``ValueError`` here, before training starts.
        log_dir: where ``events.jsonl`` goes; default ``<output_dir>/lossguard``.
    """

    def __init__(self, config: GuardConfig | None = None, *, log_dir: str | os.PathLike[str] | None = None,
                 **sections: Any) -> None:
        self.config = config if config is not None else GuardConfig(**sections)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.writer: EventWriter | None = None
        self.engine: Any = None
        self.capture = StepCapture()
        self.findings: list[Finding] = []
        self.actions: list[Action] = []
        self._failed_hooks: set[str] = set()
        self._is_main = True
        self._interval: list[Sample] = []
        self.recovery: TrainerRecovery | None = None
        self.hook_seconds = 0.0  # time spent inside lossguard's hooks, for overhead figures

    # --- events --------------------------------------------------------------------------------
    def _emit_finding(self, finding: Finding) -> None:
        self.findings.append(finding)
        if self._is_main:
            if self.writer is not None:
                self.writer.write_record(finding.to_record())
            if self.config.console:
                from lossguard.presentation.console import print_finding

                print_finding(finding)

    def _emit_action(self, action: Action) -> None:
        self.actions.append(action)
        if self._is_main:
            if self.writer is not None:
                self.writer.write_record(action.to_record())
            if self.config.console:
                from lossguard.presentation.console import print_action

                print_action(action)

    def _write(self, kind: str, **fields: Any) -> None:
        if self._is_main and self.writer is not None:
            self.writer.write(kind, **fields)

    # --- hooks ---------------------------------------------------------------------------------
    @_guarded
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._is_main = bool(state.is_world_process_zero)
        log_dir = self.log_dir or Path(args.output_dir) / self.config.log_subdir
        if self._is_main and self.writer is None:
            self.writer = EventWriter(log_dir / EVENTS_FILE)
        trainer = find_trainer()
        if trainer is not None:
            handler = trainer.callback_handler
            if self in handler.callbacks:  # run first, so our on_log keys reach the reporters
                handler.callbacks.remove(self)
                handler.callbacks.insert(0, self)
        mode = self.capture.install(trainer, model)
        total, trainable = _param_counts(model) if model is not None else (None, None)
        world = max(int(getattr(args, "world_size", 1) or 1), dist.world_size())
        self._write(
            "run",
            versions=_versions(),
            world_size=world,
            parallel_mode=str(getattr(getattr(args, "parallel_mode", None), "value", "unknown")),
            hf_device_map=_device_map(model),
            total_params=total,
            trainable_params=trainable,
            max_steps=int(state.max_steps),
            num_train_epochs=float(args.num_train_epochs),
            start_step=int(state.global_step),
            effective_batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
            per_device_train_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            logging_steps=args.logging_steps,
            save_steps=args.save_steps,
            learning_rate=args.learning_rate,
            lr_scheduler_type=str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            output_dir=str(args.output_dir),
            capture=mode,
            config=self.config.to_dict(),
        )
        try:
            from lossguard.guard import Guard

            self.engine = Guard(self.config, max_steps=int(state.max_steps),
                                num_train_epochs=float(args.num_train_epochs))
        except Exception as err:
            self.engine = None
            logger.warning("lossguard: detection unavailable (%s); recording only", err)
        if self.engine is not None and self.config.recovery.enabled:
            self.recovery = TrainerRecovery(self.config, log_dir)
            self.recovery.begin(trainer, model, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))
            resumed = self.recovery.load_resumed(args, state, self.engine)
            if resumed is not None:
                self._write("resume", step=int(state.global_step), checkpoint=str(resumed),
                            rollbacks=self.engine.policy.rollbacks, phase=self.engine.policy.phase.value)

    @_guarded
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recovery is not None:
            self.recovery.first_snapshot(int(state.global_step), self.engine)
        self.capture.begin_step()

    @_guarded
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              optimizer: Any = None, **kwargs: Any) -> None:
        if self.recovery is not None:  # before the capture reads it: the sample's lr is the one used
            self.recovery.pre_optimizer_step(self.engine, int(state.global_step) + 1)
        self.capture.before_optimizer_step(model, optimizer)

    @_guarded
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recovery is not None:
            self.recovery.post_optimizer_step()

    @_guarded
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loss, tokens, grad_norm, lr, seconds = self.capture.end_step()
        loss, tokens = dist.mean_loss_and_sum_tokens(loss, tokens)
        sample = Sample(step=int(state.global_step), loss=loss, grad_norm=grad_norm, lr=lr,
                        epoch=state.epoch, step_time_s=None if seconds is None else round(seconds, 6),
                        tokens=tokens)
        self._interval.append(sample)
        if self._is_main and self.writer is not None:
            self.writer.write_record(sample.to_record())
        if self.engine is None:
            return
        decision = self.engine.decide(sample, self.recovery.steps() if self.recovery is not None else [])
        for finding in decision.findings:
            self._emit_finding(finding)
        if self.recovery is not None:
            self.recovery.apply(decision, self.engine, int(state.global_step), control)
        for action in decision.actions:
            self._emit_action(action)

    @_guarded
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recovery is not None:
            for action in self.recovery.on_save(args, state, self.engine, self._is_main):
                self._emit_action(action)

    @_guarded
    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or not self._interval:
            return
        losses = [s.loss for s in self._interval if s.loss is not None]
        norms = [s.grad_norm for s in self._interval if s.grad_norm is not None]
        logs["lossguard/nonfinite_steps"] = float(sum(1 for v in losses if not math.isfinite(v)))
        if norms:
            logs["lossguard/grad_norm_max"] = max(norms)
        logs["lossguard/findings"] = float(len(self.findings))
        logs["lossguard/rollbacks"] = float(sum(1 for a in self.actions if a.action.value == "rollback"))
        self._interval = []

    @_guarded
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.capture.uninstall()
        self._write("end", step=int(state.global_step), findings=len(self.findings),
                    actions=len(self.actions))
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _device_map(model: Any) -> dict[str, Any] | None:
    seen = model
    for _ in range(4):
        dm = getattr(seen, "hf_device_map", None)
        if isinstance(dm, dict):
            return {str(k): str(v) for k, v in dm.items()}
        seen = getattr(seen, "base_model", None) or getattr(seen, "model", None)
        if seen is None:
            return None
    return None

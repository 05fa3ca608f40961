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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from transformers import TrainerCallback

from lossguard.config import GuardConfig
from lossguard.integrations import dist
from lossguard.integrations.hf_probe import TrainerProbe
from lossguard.integrations.hf_recovery import TrainerRecovery
from lossguard.integrations.run_info import run_record, world_size
from lossguard.integrations.step_capture import StepCapture, find_trainer
from lossguard.records import Action, Finding, Sample
from lossguard.telemetry.schema import EVENTS_FILE
from lossguard.telemetry.writer import EventWriter, set_aside

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


class LossGuard(TrainerCallback):
    """Records, diagnoses and (with recovery enabled) repairs a Trainer run.

    Args:
        config: a ``GuardConfig``; keyword sections (``detection={...}``, ``recovery={...}``)
            build one. Invalid values raise ``ValueError`` here, before training starts.
        log_dir: where ``events.jsonl`` goes; default ``<output_dir>/lossguard``.
        gpu_backend: the NVML backend for the GPU sampler (default: the real NVML when CUDA is
            in use; a ``probes.gpu.ReplayBackend`` replays a recorded timeline).
    """

    def __init__(self, config: GuardConfig | None = None, *, log_dir: str | os.PathLike[str] | None = None,
                 gpu_backend: Any = None, **sections: Any) -> None:
        self.config = config if config is not None else GuardConfig(**sections)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.writer: EventWriter | None = None
        self.engine: Any = None
        self.capture = StepCapture()
        self.findings: list[Finding] = []
        self.actions: list[Action] = []
        self._failed_hooks: set[str] = set()
        self._is_main = True
        self._distributed = False  # torch.distributed is set up before training begins
        self._first_snapshot_due = False
        self._interval: list[Sample] = []
        self._step = 0  # the optimizer step on_step_end is handling
        self.recovery: TrainerRecovery | None = None
        self.probe = TrainerProbe(self.config.probe)
        self.gpu: Any = None
        self._gpu_backend = gpu_backend
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
        self._distributed = dist.is_distributed()
        log_dir = self.log_dir or Path(args.output_dir) / self.config.log_subdir
        if self._is_main and self.writer is None:
            if int(state.global_step) == 0:  # a fresh run, not a resumed one: its own log
                set_aside(log_dir / EVENTS_FILE)
            self.writer = EventWriter(log_dir / EVENTS_FILE, background=True)
        trainer = find_trainer()
        if trainer is not None:
            handler = trainer.callback_handler
            if self in handler.callbacks:  # run first, so our on_log keys reach the reporters
                handler.callbacks.remove(self)
                handler.callbacks.insert(0, self)
        self.capture.keep_rows = self.probe.rows_wanted
        mode = self.capture.install(trainer, model)
        self._write("run", **run_record(args, state, model, self.config, mode))
        self._preflight(args, model, kwargs.get("train_dataloader"), trainer)
        try:
            self._start_gpu(args, model, log_dir)
        except Exception as err:
            logger.warning("lossguard: GPU sampler not started (%s)", err)
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
            self._first_snapshot_due = True
            resumed = self.recovery.load_resumed(args, state, self.engine)
            if resumed is not None:
                self._write("resume", step=int(state.global_step), checkpoint=str(resumed),
                            rollbacks=self.engine.policy.rollbacks, phase=self.engine.policy.phase.value)
        self.probe.begin(model, int(args.get_warmup_steps(int(state.max_steps))), int(state.max_steps))
        self.probe.batches = self.capture.kept

    def _preflight(self, args: Any, model: Any, loader: Any, trainer: Any) -> None:
        if not self._is_main:
            return
        try:
            from lossguard.preflight import preflight

            report = preflight(args, model, loader if loader is not None else getattr(trainer, "train_dataset", None),
                               world_size=world_size(args), rollback_steps=self.config.recovery.rollback_steps,
                               data_collator=None if loader is not None else getattr(trainer, "data_collator", None))
        except Exception as err:
            logger.warning("lossguard: preflight skipped (%s)", err)
            return
        if self.writer is not None:
            self.writer.write_record(report.to_record())
        if self.config.console:
            from lossguard.presentation.console import console
            from lossguard.presentation.preflight_table import preflight_table

            console().print(preflight_table(report))

    def _start_gpu(self, args: Any, model: Any, log_dir: Path) -> None:
        import torch

        on_gpu = torch.cuda.is_available() and not getattr(args, "use_cpu", False)
        if not self.config.gpu.enabled or not (on_gpu or self._gpu_backend):
            return  # before the sampler's import, which costs a CPU-only run ~35 ms
        from lossguard.probes.gpu_sampler import GpuSampler, infer_parallel_context, is_local_rank_zero

        if not is_local_rank_zero():
            return
        if self._is_main and self.writer is not None:
            emit = self.writer.write_record
        else:  # local rank 0 of another node: its own file
            emit = EventWriter(log_dir / f"gpu.rank{args.process_index}.jsonl").write_record
        self.gpu = GpuSampler(emit, backend=self._gpu_backend, interval_s=self.config.gpu.interval_s,
                              context=infer_parallel_context(args, model))
        self.gpu.start()

    @_guarded
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              optimizer: Any = None, **kwargs: Any) -> None:
        if self._first_snapshot_due and self.recovery is not None:
            # here, not at train begin: a resumed run's optimizer state and RNGs are loaded after it
            self.recovery.first_snapshot(int(state.global_step), self.engine)
            self._first_snapshot_due = False
        if self.recovery is not None:  # before the capture reads it: the sample's lr is the one used
            self.recovery.pre_optimizer_step(self.engine, int(state.global_step) + 1)
        self.capture.before_optimizer_step(model, optimizer)

    @_guarded
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recovery is not None:
            self.recovery.post_optimizer_step()

    @_guarded
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loss, counted, grad_norm, lr, seconds = self.capture.end_step()
        tokens = None
        if self._distributed:
            loss, tokens = dist.mean_loss_and_sum_tokens(loss, None if counted is None else int(counted))
            counted = None
        # otherwise the count is read where the log line is formatted: nothing here needs it
        sample = Sample(step=int(state.global_step), loss=loss, grad_norm=grad_norm, lr=lr,
                        epoch=state.epoch, step_time_s=seconds, tokens=tokens)  # rounded where it is written
        self._interval.append(sample)
        if self._is_main and self.writer is not None:
            self.writer.write_sample(sample, tokens=counted)
        if self.engine is None:
            return
        step = self._step = int(state.global_step)
        self.probe.observe_step(seconds)
        if self.probe.due(step):
            self._write_probe(self.probe.run(step, lr, "every_n_steps"))
        rec = self.recovery
        decision = self.engine.decide(sample, rec.steps() if rec is not None else [],
                                      probe=self._probe_plateau if self.config.probe.enabled else None,
                                      flush=rec is not None and rec.due(step))
        for finding in decision.findings:
            self._emit_finding(finding)
        if rec is not None:
            rec.apply(decision, self.engine, step, control)
        for action in decision.actions:
            self._emit_action(action)

    def _probe_plateau(self, finding: Finding) -> dict[str, Any] | None:
        # the weights probed are this step's, which is up to batch_steps - 1 past the finding's
        record = self.probe.run(self._step, self.capture.lr, finding.reason.value)
        self._write_probe(record)
        return record

    def _write_probe(self, record: dict[str, Any] | None) -> None:
        if record is not None and self._is_main and self.writer is not None:
            self.writer.write_record(record)

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
        if self.gpu is not None:
            self.gpu.flush(step=int(state.global_step))

    @_guarded
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.capture.uninstall()
        if self.engine is not None:  # the last steps' samples, still held back for the detectors
            for finding in self.engine.flush():
                self._emit_finding(finding)
        if self.recovery is not None:
            self.recovery.end()
        if self.gpu is not None:
            self.gpu.stop(step=int(state.global_step))
            self.gpu = None
        self._write("end", step=int(state.global_step), findings=len(self.findings),
                    actions=len(self.actions))
        if self.writer is not None:
            self.writer.close()
            self.writer = None


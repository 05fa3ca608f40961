"""``LossGuard``: the Hugging Face ``TrainerCallback``, a thin adapter around the engine.

``Trainer(..., callbacks=[LossGuard()])`` records every optimizer step into
``<output_dir>/lossguard/events.jsonl``, runs the detectors on it and reports findings as they
happen. Every hook is guarded: a failure inside lossguard logs one warning (per distinct
failure) and training goes on. A second ``LossGuard`` on the same Trainer switches itself off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lossguard.config import GuardConfig, resolve_config
from lossguard.integrations import dist
from lossguard.integrations.core import Reporter, carry_out, contained
from lossguard.integrations.engines import detect as detect_engine
from lossguard.integrations.engines import run_config
from lossguard.integrations.hf_extras import (
    claim_run,
    interval_logs,
    run_first,
    run_preflight,
    start_gpu_sampler,
)
from lossguard.integrations.hf_probe import TrainerProbe
from lossguard.integrations.hf_recovery import TrainerRecovery, snapshot_cost
from lossguard.integrations.references import run_references
from lossguard.integrations.run_info import run_record
from lossguard.integrations.safety_net import Judge, trainer_judge
from lossguard.integrations.step_capture import StepCapture, find_trainer
from lossguard.numbers import as_float
from lossguard.records import Action, Finding, Sample
from lossguard.telemetry.resume_scan import scan_for_resume
from lossguard.telemetry.schema import EVENTS_FILE

logger = logging.getLogger("lossguard")


class LossGuard(TrainerCallback):
    """Records, diagnoses and (with recovery enabled) repairs a Trainer run.

    Args:
        config: a ``GuardConfig``; keyword sections (``detection={...}``, ``recovery={...}``)
            build one. Invalid values raise ``ValueError`` here, before training starts.
        log_dir: where ``events.jsonl`` goes; default ``<output_dir>/lossguard``.
        gpu_backend: the NVML backend for the GPU sampler (default: the real NVML when CUDA is
            in use; a ``gpu.replay.ReplayBackend`` replays a recorded timeline).
    """

    def __init__(self, config: GuardConfig | None = None, *, log_dir: str | os.PathLike[str] | None = None,
                 gpu_backend: Any = None, **sections: Any) -> None:
        self.config = self._user_config = resolve_config("LossGuard", config, sections)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.report = Reporter(self.config)
        self.engine: Any = None
        self.capture = StepCapture()
        self._failed_hooks: set[str] = set()
        self._distributed = False  # torch.distributed is set up before training begins
        self._interval: list[Sample] = []
        self._step = 0  # the optimizer step on_step_end is handling
        self.recovery: TrainerRecovery | None = None
        self.probe = TrainerProbe(self.config.probe)
        self.gpu: Any = None
        self._gpu_backend = gpu_backend
        self.hook_seconds = 0.0  # time spent inside lossguard's hooks, for overhead figures
        self.judge: Judge | None = None  # the safety net's judge (recovery.safety_net)
        self.disabled = False  # another LossGuard on the same Trainer took this run
        self.engine_info: Any = None  # the training engine (``engines.Engine``) and what lossguard does under it

    @property
    def findings(self) -> list[Finding]:
        return self.report.findings

    @property
    def actions(self) -> list[Action]:
        return self.report.actions

    # --- hooks ---------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.disabled = not claim_run(state, self)  # a second LossGuard on this Trainer switches itself off
        if self.disabled:
            return
        self._begin(args, state, control, model, **kwargs)

    @contained
    def _begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.report.is_main = bool(state.is_world_process_zero)
        self._distributed = dist.is_distributed()
        log_dir = self.log_dir or Path(args.output_dir) / self.config.log_subdir
        # what the log says about the resumed step, read before this run appends to it
        scan = scan_for_resume(log_dir / EVENTS_FILE, int(state.global_step)) \
            if int(state.global_step) > 0 and self.report.is_main else None
        self.report.open(log_dir, resumed=int(state.global_step) > 0, background=True)
        trainer = find_trainer()
        run_first(trainer, self)
        wrapped = getattr(trainer, "model_wrapped", None)
        self.engine_info = detect_engine(wrapped if wrapped is not None else model, args=args,
                                         accelerator=getattr(trainer, "accelerator", None),
                                         world_size=dist.world_size())
        line = self.engine_info.line(probe=self.config.probe.enabled)
        if line and self.report.is_main:
            logger.warning("%s", line)
        self.config = run_config(self._user_config, self.engine_info)  # this run's: recovery off where ruled out
        recovery = self.config.recovery.enabled
        if not self.engine_info.probe:
            self.probe.off = self.engine_info.probe_why
        self.capture.keep_rows = self.probe.rows_wanted
        self.judge = trainer_judge(trainer, model, self.config.recovery, self.capture) if recovery else None
        mode = self.capture.install(trainer, model)
        cost = snapshot_cost(self.config, log_dir, trainer, model, kwargs.get("optimizer"), int(state.max_steps)) \
            if recovery else None
        self.report.write("run", **run_record(args, state, model, self.config, mode, cost),
                          engine=self.engine_info.to_record())
        run_preflight(self.report, self.config, args, model, kwargs.get("train_dataloader"), trainer, cost)
        self.gpu = start_gpu_sampler(self.report, self.config, args, model, log_dir, self._gpu_backend)
        try:
            from lossguard.guard import Guard

            self.engine = Guard(self.config, max_steps=int(state.max_steps),
                                num_train_epochs=float(args.num_train_epochs))
        except Exception as err:
            self.engine = None
            logger.warning("lossguard: detection unavailable (%s); recording only", err)
        if self.engine is not None:
            refs = run_references(trainer, model)
            self.engine.set_references(refs)
            self.report.write("references", **refs.to_dict())
        if self.engine is not None and recovery:
            self.recovery = TrainerRecovery(self.config, log_dir)
            self.recovery.begin(trainer, model, kwargs.get("optimizer"), kwargs.get("lr_scheduler"),
                                engine=self.engine, is_main=self.report.is_main, cost=cost)
            self.recovery.load_resumed(args, state, self.engine, self.report, scan)
        self.probe.begin(model, int(args.get_warmup_steps(int(state.max_steps))), int(state.max_steps),
                         micro_batches=int(args.gradient_accumulation_steps))
        self.probe.batches = self.capture.kept

    @contained
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              optimizer: Any = None, **kwargs: Any) -> None:
        if self.recovery is not None:  # before the capture reads it: the sample's lr is the one used
            self.recovery.pre_optimizer_step(self.engine, int(state.global_step))
        self.capture.before_optimizer_step(model, optimizer)

    @contained
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recovery is not None:
            self.recovery.post_optimizer_step()

    @contained
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        got = self.capture.end_step()
        loss, counted, tokens = got.loss, got.tokens, None
        if self._distributed:
            loss, tokens = dist.mean_loss_and_sum_tokens(loss, None if counted is None else int(counted))
            counted = None
        # otherwise the count is read where the log line is formatted: nothing here needs it
        sample = Sample(step=int(state.global_step), loss=loss, grad_norm=got.grad_norm, lr=got.lr,
                        epoch=state.epoch, step_time_s=got.seconds, tokens=tokens)  # rounded where it is written
        self._interval.append(sample)
        if self.report.is_main and self.report.writer is not None:
            self.report.writer.write_sample(sample, tokens=counted)
        if self.engine is None:
            return
        step = self._step = int(state.global_step)
        self.probe.observe_step(got.seconds)
        if self.probe.due(step):
            self.report.write_record(self.probe.run(step, got.lr, "every_n_steps"))
        rec = self.recovery
        if rec is not None:
            rec.observe_step(args, state, got.seconds, self.report)
        decision = self.engine.decide(sample, rec.steps() if rec is not None else [],
                                      probe=self._probe_plateau if self.config.probe.enabled else None,
                                      flush=rec is not None and rec.due(step), judge=self._judge())
        done = carry_out(decision, self.report, rec.recoverer if rec is not None else None, self.engine, step,
                         self._judge())
        if rec is not None:
            rec.applied(done, control, step, args.output_dir, refused=self.report.write_refused())

    def _judge(self) -> Judge | None:
        rec = self.recovery
        return self.judge if rec is not None and rec.recoverer is not None else None

    def _probe_plateau(self, finding: Finding) -> dict[str, Any] | None:
        # the weights probed are this step's, which is up to batch_steps - 1 past the finding's
        record = self.probe.run(self._step, self.capture.lr, finding.reason.value)
        self.report.write_record(record)
        return record

    @contained
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recovery is not None:
            for action in self.recovery.on_save(args, state, self.engine, self.report.is_main):
                self.report.emit(action)

    @contained
    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or not self._interval:
            return
        logs.update(interval_logs(self._interval, self.report))
        self._interval = []
        if self.gpu is not None:
            self.gpu.flush(step=int(state.global_step))

    @contained
    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        loss = as_float((metrics or {}).get("eval_loss"), finite=True)
        if loss is None:
            return
        step = int(state.global_step)
        self.report.write("eval", step=step, eval_loss=loss)
        if self.engine is not None:
            self.engine.observe_eval(step, loss)

    @contained
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.capture.uninstall()
        if self.engine is not None:  # the last steps' samples, still held back for the detectors
            for finding in self.engine.flush():
                self.report.emit(finding)
        if self.recovery is not None:
            if self.engine is not None:  # a rollback still on trial: the run ends with the better branch
                carry_out(self.engine.conclude(int(state.global_step), self._judge()), self.report,
                          self.recovery.recoverer, self.engine, int(state.global_step))
            self.recovery.end()
        if self.gpu is not None:
            self.gpu.stop(step=int(state.global_step))
            self.gpu = None
        self.report.close(int(state.global_step))

"""``LoopGuard``: LossGuard's detection and recovery for hand-written loops (plain PyTorch, Accelerate).

    guard = LoopGuard(model, optimizer, scheduler, log_dir="runs/x/lossguard", max_steps=1000)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if guard.step(loss).stop:
            break
    guard.close()

Call ``guard.step(loss)`` once per optimizer step, after ``backward()``; after ``optimizer.step()``
is best, before it works too (a rollback then drops the pending gradients). The LR override is
applied through torch's optimizer step hooks, so the LR of every ``optimizer.step()`` is exactly
``factor x`` whatever the scheduler set, wherever ``guard.step`` is called.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lossguard.config import GuardConfig, resolve_config
from lossguard.guard import Guard
from lossguard.integrations import core, dist
from lossguard.integrations.core import Reporter, carry_out
from lossguard.integrations.engines import detect as detect_engine
from lossguard.integrations.engines import run_config
from lossguard.integrations.references import model_references
from lossguard.integrations.safety_net import Judge, TrainingRows, per_rank
from lossguard.records import Action, ActionKind, Finding, Sample
from lossguard.recovery.apply import Recoverer
from lossguard.recovery.sharding import full_tensor
from lossguard.recovery.snapshot import trainable_parameters, unwrap
from lossguard.signals.references import References

logger = logging.getLogger("lossguard")


@dataclass
class StepResult:
    """What ``LoopGuard.step`` saw and did at one step."""

    step: int
    findings: list[Finding] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    rolled_back_to: int | None = None
    save: bool = False  # recovery asks for a checkpoint now (written by the guard when it has a checkpoint_dir)
    stop: bool = False


class LoopGuard:
    """Records, diagnoses and repairs a hand-written training loop.

    Args:
        model, optimizer, scheduler: the live training objects (a scheduler is optional).
        config: a ``GuardConfig`` (or keyword sections, as for ``LossGuard``).
        log_dir: where ``events.jsonl`` goes; nothing is written when None.
        max_steps, num_train_epochs: the planned length (tells a premature plateau from convergence).
        judge_batches: held-out batches (dicts of tensors with ``labels``, as ``model(**batch)``
            takes them) on which the safety net judges every rollback; by default the first
            ``recovery.judge_sequences`` training sequences the model is called with.
        checkpoint_dir: where the guard writes the checkpoints recovery asks for (after a rollback,
            the restored state as ``lossguard-fallback-<step>``; after the LR is restored, the
            recovered one), with ``torch.distributed.checkpoint``; read one back with
            ``lossguard.load_checkpoint``. None: ``StepResult.save`` only says when to save.
    """

    def __init__(self, model: Any, optimizer: Any, scheduler: Any = None, *, config: GuardConfig | None = None,
                 log_dir: str | os.PathLike[str] | None = None, max_steps: int | None = None,
                 num_train_epochs: float | None = None, start_step: int = 0,
                 judge_batches: Sequence[Mapping[str, Any]] | None = None,
                 references: References | None = None, checkpoint_dir: str | os.PathLike[str] | None = None,
                 **sections: Any) -> None:
        self.engine_info = detect_engine(model, world_size=dist.world_size(), loop=True)
        self.config = run_config(resolve_config("LoopGuard", config, sections), self.engine_info)
        self.model = model
        self.engine = Guard(self.config, max_steps=max_steps, num_train_epochs=num_train_epochs)
        self.global_step = start_step
        self.report = Reporter(self.config, is_main=dist.rank() == 0)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        if self.log_dir is not None:
            self.report.open(self.log_dir, resumed=start_step > 0)
        self.recoverer: Recoverer | None = None
        self._remove_hooks = None
        self._optimizer_steps = 0
        self._last_lr: float | None = None
        self._t0: float | None = None
        self._max_steps = max_steps
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        line = self.engine_info.line(probe=False)
        if line and self.report.is_main:
            logger.warning("%s", line)
        if self.config.recovery.enabled:
            self._start_recovery(model, optimizer, scheduler, start_step, max_steps)
        self.judge: Judge | None = None
        self._rows: TrainingRows | None = None
        cfg = self.config.recovery
        if cfg.enabled and cfg.safety_net and self.recoverer is not None:
            if judge_batches is None:
                self._rows = TrainingRows(model, per_rank(cfg.judge_sequences))
            self.judge = Judge(model, judge_batches if judge_batches is not None else self._rows.kept,
                               cfg.judge_sequences)
        self._post = optimizer.register_step_post_hook(self._after_optimizer_step)
        self._optimizer = optimizer
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in trainable_parameters(model).values())
        self.report.write("run", world_size=dist.world_size(), total_params=total, trainable_params=trainable,
                    max_steps=max_steps, start_step=start_step, capture="loop", config=self.config.to_dict(),
                    engine=self.engine_info.to_record(),
                    cost=self.recoverer.cost.summary() if self.recoverer is not None and self.recoverer.cost else None)
        # the no-learning levels a plateau is weighed against: the model's (uniform) unless given
        # (``label_references`` over the training rows adds the unigram level)
        refs = model_references(model)
        self.set_references(references.merged(refs) if references is not None else refs)

    def _start_recovery(self, model: Any, optimizer: Any, scheduler: Any, start_step: int,
                        max_steps: int | None) -> None:
        """The recoverer and the run's first snapshot; when that fails on any rank, every rank records
        and detects only (one warning says why): a rank without snapshots cannot roll back with the others."""
        error: Exception | None = None
        try:
            spill = dist.snapshot_folder(self.config.recovery.snapshot_dir, self.log_dir)
            self.recoverer = Recoverer(model, optimizer, scheduler, config=self.config.recovery, spill_dir=spill)
            self.recoverer.set_cost(core.measure_snapshot_cost(self.config, model, optimizer, spill, max_steps))
            self.recoverer.snapshot(start_step, self.engine.frozen_detector_state())
        except Exception as err:
            error = err
        if dist.any_rank(error is not None):
            why = f"{type(error).__name__}: {error}" if error is not None else "another rank failed to set it up"
            logger.warning("lossguard: recovery is off for this run (%s); recording and detection go on", why)
            if self.recoverer is not None:
                self.recoverer.close()
            self.recoverer = None
            return
        assert self.recoverer is not None
        self._remove_hooks = self.recoverer.install_step_hooks(
            lambda: self.engine.lr_multiplier(self.global_step + 1))

    def set_references(self, references: References) -> None:
        """The levels and objective this run's loss is judged against (``lossguard.References``)."""
        self.engine.set_references(references)
        self.report.write("references", **references.to_dict())

    def observe_eval(self, step: int, loss: float) -> None:
        """An evaluation loss at ``step``: a still-falling eval loss contradicts a plateau, a flat
        one a divergence."""
        self.engine.observe_eval(int(step), float(loss))
        self.report.write("eval", step=int(step), eval_loss=float(loss))

    @property
    def findings(self) -> list[Finding]:
        return self.report.findings

    @property
    def actions(self) -> list[Action]:
        return self.report.actions

    def _after_optimizer_step(self, optimizer: Any, *args: Any) -> None:
        self._optimizer_steps += 1
        self._last_lr = float(optimizer.param_groups[0]["lr"]) * self.engine.lr_multiplier(self.global_step + 1)

    # --- the loop ------------------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float | None, *, grad_norm: torch.Tensor | float | None = None,
             tokens: int | None = None) -> StepResult:
        """Record one optimizer step's loss, run detection, and carry out recovery.

        ``grad_norm``: the norm ``clip_grad_norm_`` returned (a tensor, or a DTensor under FSDP2,
        is read here); without it the guard computes it from ``.grad`` when called before the
        optimizer step."""
        try:
            return self._step(loss, grad_norm, tokens)
        except Exception as err:  # lossguard must never break the user's training
            logger.warning("lossguard: step failed (%s: %s); training continues", type(err).__name__, err)
            self.global_step += 1
            return StepResult(self.global_step)

    def _step(self, loss: Any, grad_norm: float | None, tokens: int | None) -> StepResult:
        now = time.perf_counter()
        self.global_step += 1
        step = self.global_step
        stepped = self._optimizer_steps >= step  # the optimizer already took this step
        value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else loss
        value, tokens = dist.mean_loss_and_sum_tokens(value, tokens)
        if grad_norm is None and not stepped:
            norm = core.grad_norm(self.model.parameters())
            grad_norm = None if norm is None else float(norm)
        elif isinstance(grad_norm, torch.Tensor):
            grad_norm = float(full_tensor(grad_norm))
        lr = self._last_lr if stepped else (
            float(self._optimizer.param_groups[0]["lr"]) * self.engine.lr_multiplier(step))
        sample = Sample(step=step, loss=value, grad_norm=grad_norm, lr=lr, tokens=tokens,
                        step_time_s=None if self._t0 is None else round(now - self._t0, 6))
        self._t0 = now
        self.report.write_record(sample.to_record())
        rec = self.recoverer
        core.pace_snapshots(rec, self.report, step, sample.step_time_s, max_steps=self._max_steps)
        label = step if stepped else step - 1  # the step whose weights a snapshot now would hold
        decision = self.engine.decide(sample, rec.ring.steps() if rec is not None else [],
                                      flush=rec is not None and (rec.due(label) or not len(rec.ring)),
                                      judge=self.judge)
        done = carry_out(decision, self.report, rec, self.engine, label, self.judge)
        actions = list(decision.actions)
        if done.save and self.checkpoint_dir is not None:
            actions += self._save(step, done.rolled_back_to)
        return StepResult(step, findings=decision.findings, actions=actions,
                          rolled_back_to=done.rolled_back_to, save=done.save, stop=done.stop)

    def _save(self, step: int, restored: int | None) -> list[Action]:
        """The checkpoint recovery asked for, into ``checkpoint_dir`` (every rank writes its part)."""
        from lossguard.inspection import FALLBACK_PREFIX
        from lossguard.integrations.loop_checkpoint import save_checkpoint

        assert self.checkpoint_dir is not None
        path = self.checkpoint_dir / (f"{FALLBACK_PREFIX}{step}" if restored is not None
                                      else f"lossguard-recovered-{step}")
        held = f"the state of step {restored} that the rollback restored" if restored is not None else \
            f"the recovered state of step {step}"
        message = f"wrote {path.name} (torch.distributed.checkpoint): it holds {held}; " \
                  "resume with lossguard.load_checkpoint"
        try:
            save_checkpoint(path, self.model, unwrap(self._optimizer), guard_state=self.state_dict(),
                            note={"step": step, "restored_from_step": restored, "message": message})
        except Exception as err:  # a full disk must not end training: the state is still in memory
            logger.warning("lossguard: the checkpoint recovery asked for at step %d was not written (%s: %s); "
                           "training continues", step, type(err).__name__, err)
            return []
        action = Action(ActionKind.SAVE, step, message, from_step=restored, to_step=step,
                        details={"path": str(path), "format": "torch.distributed.checkpoint"})
        self.report.emit(action)
        return [action]

    @property
    def should_stop(self) -> bool:
        return any(a.action is ActionKind.GIVE_UP for a in self.actions) and self.config.recovery.on_give_up == "stop"

    def close(self) -> None:
        """Report what the last held-back samples show, remove the optimizer hooks, close the log."""
        try:
            for finding in self.engine.flush():
                self.report.emit(finding)
            # a rollback still on trial: the run ends with the better branch
            carry_out(self.engine.conclude(self.global_step, self.judge), self.report, self.recoverer, self.engine,
                      self.global_step)
        except Exception as err:  # lossguard must never break the user's training
            logger.warning("lossguard: last detection failed (%s: %s)", type(err).__name__, err)
        if self._rows is not None:
            self._rows.remove()
        if self._remove_hooks is not None:
            self._remove_hooks()
            self._remove_hooks = None
        self._post.remove()
        if self.recoverer is not None:
            self.recoverer.close()  # its snapshots are scratch for this run
        self.report.close(self.global_step)

    def __enter__(self) -> LoopGuard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        self.global_step = int(state["global_step"])

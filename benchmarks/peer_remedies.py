"""The remedies users have today, as Trainer callbacks that act, for ``benchmarks/recovery.py``.

Each is as close to its source's defaults as a Hugging Face ``Trainer`` allows; where the
project already re-implemented a rule's decision (``lossguard.testing.peers``, with its sources),
the callback only carries that decision out:

- ``SkipStep``: OLMo-core's skip-step optimizers (``peers.OLMoSkipStep`` decides: loss or grad
  norm before clipping more than 6 standard deviations above the mean of the previous 128, once
  64 are seen; a NaN anywhere in the window fails the check). A skipped step changes nothing, as
  there (no weight decay, no moment update, no step count): every gradient is taken away before
  AdamW's step, which then leaves every parameter alone.
- ``ZClip``: adaptive gradient clipping (bluorion-com/ZClip, ``zclip/zclip.py``, defaults): an
  EMA (alpha 0.97) of the gradient norm's mean and variance, started from the mean and variance
  of the first 25 norms (warmup: clipped to ``max_grad_norm`` only); after that a norm whose
  z-score exceeds 2.5 is clipped to mean + 2.5 std / (z / 2.5) ("adaptive_scaling"), never above
  ``max_grad_norm`` (1.0), and the EMA is fed the clipped value.
- ``PlateauCut``: a plain LR cut on plateau (``peers.TorchReduceLROnPlateau`` decides: torch's
  defaults, factor 0.1, patience 10, relative threshold 1e-4) over the mean training loss of
  every ``window`` (25) steps, each cut multiplying the run's own schedule by 0.1.

SkipStep and ZClip clip the gradients themselves (to 1.0, the Trainer's default): run them with
``max_grad_norm=0`` so that the norm they read is the one before clipping.

Each keeps ``seconds``, the time spent in its own code, for the extra-compute column.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from transformers import TrainerCallback

from lossguard.testing.peers import OLMoSkipStep, TorchReduceLROnPlateau


def _trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad.detach().float().norm(2) for p in params if p.grad is not None]
    return float(torch.stack(grads).norm(2)) if grads else 0.0


class _StepLoss(TrainerCallback):
    """Captures the current step's training loss from the model's forward (gradient accumulation 1)."""

    def __init__(self) -> None:
        self.loss: float | None = None
        self.seconds = 0.0
        self._handle: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        def hook(module: Any, a: Any, kwargs: Any, out: Any) -> Any:
            if module.training and torch.is_grad_enabled() and getattr(out, "loss", None) is not None:
                self.loss = float(out.loss.detach())
            return out

        self._handle = model.register_forward_hook(hook, with_kwargs=True)

    def on_train_end(self, *a: Any, **kw: Any) -> None:
        if self._handle is not None:
            self._handle.remove()


class SkipStep(_StepLoss):
    """OLMo-core-style skip-step: drop the update when loss or grad norm > mean + 6 sigma of the last 128."""

    name = "skip-step"

    def __init__(self, max_grad_norm: float = 1.0) -> None:
        super().__init__()
        self.rule = OLMoSkipStep()
        self.max_grad_norm = max_grad_norm
        self.skipped: list[int] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        t0 = time.perf_counter()
        params = _trainable(model)
        norm = _norm(params)
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)  # the Trainer's clipping, moved here
        step = int(state.global_step) + 1
        if self.rule.update(step, self.loss if self.loss is not None else math.nan, norm) is not None:
            for p in params:
                p.grad = None  # AdamW leaves a parameter without a gradient untouched
            self.skipped.append(step)
        self.seconds += time.perf_counter() - t0


class ZClip(TrainerCallback):
    """ZClip-style adaptive gradient clipping: EMA z-score 2.5, adaptive scaling, max norm 1.0."""

    name = "zclip"

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float = 1.0,
                 warmup_steps: int = 25, eps: float = 1e-6) -> None:
        self.alpha, self.z_thresh, self.max_grad_norm = alpha, z_thresh, max_grad_norm
        self.warmup_steps, self.eps = warmup_steps, eps
        self.warmup: list[float] = []
        self.mean: float | None = None
        self.var = 0.0
        self.clipped = 0
        self.seconds = 0.0

    def _threshold(self, norm: float) -> float | None:
        assert self.mean is not None
        std = self.var**0.5
        z = (norm - self.mean) / (std + self.eps)
        if z <= self.z_thresh:
            return None
        return self.mean + self.z_thresh * std / (z / self.z_thresh)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        t0 = time.perf_counter()
        params = _trainable(model)
        norm = _norm(params)
        if self.mean is None:
            self.warmup.append(norm)
            if len(self.warmup) >= self.warmup_steps:
                self.mean = statistics.fmean(self.warmup)
                self.var = statistics.fmean((x - self.mean) ** 2 for x in self.warmup)
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            threshold = self._threshold(norm)
            limit = min(threshold if threshold is not None else norm, self.max_grad_norm)
            if norm > limit:
                scale = limit / (norm + 1e-6)
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            if threshold is not None:
                self.clipped += 1
            fed = threshold if threshold is not None else norm
            if fed == fed:  # a NaN norm would poison the EMA for good
                self.mean = self.alpha * self.mean + (1 - self.alpha) * fed
                self.var = self.alpha * self.var + (1 - self.alpha) * (fed - self.mean) ** 2
        self.seconds += time.perf_counter() - t0


class PlateauCut(_StepLoss):
    """ReduceLROnPlateau (torch's defaults) on the mean training loss of each ``window`` steps, as an LR multiplier."""

    name = "plateau-cut"

    def __init__(self, window: int = 25, factor: float = 0.1) -> None:
        super().__init__()
        self.window, self.factor = window, factor
        self.rule = TorchReduceLROnPlateau()
        self.multiplier = 1.0
        self._losses: list[float] = []
        self._scheduled: list[float] | None = None
        self.cuts: list[int] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        groups = optimizer.param_groups
        self._scheduled = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] *= self.multiplier

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        if self._scheduled is not None:  # the scheduler never sees the cut
            for g, lr in zip(optimizer.param_groups, self._scheduled):
                g["lr"] = lr
            self._scheduled = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        t0 = time.perf_counter()
        self._losses.append(self.loss if self.loss is not None else math.nan)
        step = int(state.global_step)
        if step % self.window == 0:
            if self.rule.update(step, statistics.fmean(self._losses), None) is not None:
                self.multiplier *= self.factor
                self.cuts.append(step)
            self._losses = []
        self.seconds += time.perf_counter() - t0

"""The remedies users have today, as Trainer callbacks, for ``benchmarks/recovery.py``.

Re-implemented from their sources' descriptions (no code copied), each as close to its defaults
as a Hugging Face ``Trainer`` allows:

- ``SkipStep``: OLMo-core's ``SkipStepOptimizer`` (``olmo_core/optim/skip_step_optimizer.py``):
  the update is dropped when the step's loss or its gradient norm (before clipping) is more than
  ``sigma_factor`` (6) standard deviations above the mean of the previous values in a rolling
  window of ``rolling_interval_length`` (128), once at least half a window has been seen. A
  dropped step changes nothing: no weight decay, no moment update, no step count (their
  ``step_increment_bugfix``); here, by taking every gradient away before AdamW's step, which
  then skips every parameter. The values of skipped steps stay in the window, as there, and a
  NaN in the window fails the comparison, so every step is skipped until it has left the window
  (torch's mean and std of a window holding a NaN are NaN there too).
- ``ZClip``: adaptive gradient clipping (bluorion-com/ZClip, ``zclip/zclip.py``, defaults):
  an EMA (alpha 0.97) of the gradient norm's mean and variance, started from the mean and
  variance of the first 25 norms (warmup, clipped to ``max_grad_norm`` only); after that a norm
  whose z-score exceeds 2.5 is clipped to mean + 2.5 std / (z / 2.5) ("adaptive_scaling"),
  never above ``max_grad_norm`` (1.0), and the EMA is fed the clipped value. It replaces the
  Trainer's own clipping (run with ``max_grad_norm=0``; ZClip clips to 1.0 itself, the
  Trainer's default).
- ``PlateauCut``: torch's ``ReduceLROnPlateau`` with its defaults (factor 0.1, patience 10,
  relative threshold 1e-4), stepped with the mean training loss of every ``window`` (25) steps,
  its LR cut applied as a multiplier on top of the run's schedule.

Each keeps ``seconds``, the time spent in its own code, for the extra-compute column.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from transformers import TrainerCallback


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

    def __init__(self, window: int = 128, sigmas: float = 6.0, max_grad_norm: float = 1.0) -> None:
        super().__init__()
        self.window, self.sigmas, self.max_grad_norm = window, sigmas, max_grad_norm
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.skipped: list[int] = []

    def _within(self, values: list[float]) -> bool:
        """As OLMo-core compares: a NaN anywhere in the window (or now) fails it, so the step is skipped."""
        history, latest = values[:-1], values[-1]
        mean = sum(history) / len(history)
        std = math.sqrt(sum((v - mean) ** 2 for v in history) / (len(history) - 1))  # torch.std: unbiased
        return latest - mean <= self.sigmas * std

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        t0 = time.perf_counter()
        params = _trainable(model)
        norm = _norm(params)
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)  # the Trainer's clipping, moved here
        loss = self.loss if self.loss is not None else float("nan")
        for values, value in ((self.losses, loss), (self.norms, norm)):
            values.append(value)
            del values[:-(self.window + 1)]
        if len(self.losses) >= max(2, self.window // 2):
            if not (self._within(self.losses) and self._within(self.norms)):
                for p in params:
                    p.grad = None  # AdamW leaves a parameter without a gradient untouched
                self.skipped.append(int(state.global_step) + 1)
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
    """torch ReduceLROnPlateau (defaults) on the mean training loss of each ``window`` steps, as an LR multiplier."""

    name = "plateau-cut"

    def __init__(self, window: int = 25) -> None:
        super().__init__()
        self.window = window
        self._dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(self._dummy)
        self._losses: list[float] = []
        self._scheduled: list[float] | None = None
        self.cuts: list[int] = []

    @property
    def multiplier(self) -> float:
        return float(self._dummy.param_groups[0]["lr"])

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        t0 = time.perf_counter()
        groups = optimizer.param_groups
        self._scheduled = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] *= self.multiplier
        self.seconds += time.perf_counter() - t0

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
        if self._scheduled is not None:  # the scheduler never sees the cut
            for g, lr in zip(optimizer.param_groups, self._scheduled):
                g["lr"] = lr
            self._scheduled = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        t0 = time.perf_counter()
        if self.loss is not None and self.loss == self.loss:
            self._losses.append(self.loss)
        if int(state.global_step) % self.window == 0 and self._losses:
            before = self.multiplier
            self.plateau.step(statistics.fmean(self._losses))
            self._losses = []
            if self.multiplier < before:
                self.cuts.append(int(state.global_step))
        self.seconds += time.perf_counter() - t0

"""Capturing what one optimizer step really did, from inside a running Trainer.

The Trainer logs only every ``logging_steps``, averages over the interval and (with
``logging_nan_inf_filter``) replaces NaN losses by the running mean, so none of its logs show the
raw loss of a step. Without subclassing the Trainer, lossguard wraps two methods of the running
instance for the duration of ``train()``:

- ``trainer.training_step``: its return value is each micro-batch's share of the step loss (the
  Trainer already scales it for gradient accumulation), so their sum is the step loss exactly as
  the Trainer would report it, NaN included;
- ``trainer.accelerator.clip_grad_norm_``: its return value is the gradient norm before clipping.

Both wrappers only read values; they never change what the Trainer computes. When the Trainer
cannot be found (an unusual Trainer subclass, a manual callback call), a forward hook on the model
captures the loss instead, and the gradient norm is computed from ``.grad`` before the optimizer
step (after clipping, marked as such).
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lossguard.integrations.core import grad_norm
from lossguard.recovery.sharding import full_tensor

logger = logging.getLogger("lossguard")


def find_trainer(max_depth: int = 12) -> Any | None:
    """The ``transformers.Trainer`` whose ``train()`` is running up the call stack, if any."""
    try:
        from transformers import Trainer
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    frame = inspect.currentframe()
    depth = 0
    while frame is not None and depth < max_depth + 8:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
        depth += 1
    return None


def _token_source(inputs: Any) -> torch.Tensor | int | None:
    """What a micro-batch's token count comes from: its attention mask, else its number of input ids."""
    if not isinstance(inputs, dict):
        return None
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return mask.detach() if mask.requires_grad else mask
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    return None


class TokenCount:
    """A step's token count, summed from its micro-batches' attention masks when first read.

    Nothing in the step's decisions needs it, so the Trainer callback hands it to the log's
    writer thread, which reads it there: the training thread does not pay for the reduction
    (a kernel launch and a sync on a GPU). ``int()``
    reads it.
    """

    __slots__ = ("_parts", "_value")

    def __init__(self, parts: list[torch.Tensor | int]) -> None:
        self._parts = parts
        self._value: int | None = None

    def __int__(self) -> int:
        if self._value is None:
            self._value = sum(p if isinstance(p, int) else int(p.sum()) for p in self._parts)
            self._parts = []
        return self._value

    __index__ = __int__

    def __eq__(self, other: object) -> bool:
        return int(self) == other if isinstance(other, int) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TokenCount({int(self)})"


@dataclass(frozen=True, slots=True)
class StepReading:
    """What one optimizer step did, as ``StepCapture.end_step`` read it; None where not seen."""

    loss: float | None
    tokens: TokenCount | None
    grad_norm: float | None
    lr: float | None
    seconds: float | None


class StepCapture:
    """Accumulates loss, tokens and gradient norm over the micro-batches of one optimizer step."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter, keep_rows: int = 0) -> None:
        self._clock = clock
        self._loss: torch.Tensor | None = None
        self._tokens: list[torch.Tensor | int] = []
        self._micro = 0
        self._hook_losses = False
        # the norm as clip_grad_norm_ returned it (on a GPU a device tensor): read in end_step,
        # after the optimizer step is queued, not between clipping and the step
        self.grad_norm: torch.Tensor | float | None = None
        self.grad_norm_clipped = False
        self.lr: float | None = None
        self._t0: float | None = None
        self._restore: list[Callable[[], None]] = []
        self.keep_rows = keep_rows  # training sequences kept (on CPU) for the Hessian probe
        self.kept: list[dict[str, Any]] = []
        self._kept_rows = 0
        self.mode = "none"

    # --- installing -------------------------------------------------------------------------
    def install(self, trainer: Any | None, model: Any) -> str:
        """Wrap ``trainer``'s methods (or hook ``model``); returns the capture mode used."""
        self.uninstall()
        if trainer is not None and callable(getattr(trainer, "training_step", None)):
            self._wrap(trainer, "training_step", self._after_training_step, before=self._start_clock)
            accelerator = getattr(trainer, "accelerator", None)
            if accelerator is not None and callable(getattr(accelerator, "clip_grad_norm_", None)):
                self._wrap(accelerator, "clip_grad_norm_", self._after_clip)
            self.mode = "trainer"
        elif model is not None:
            for handle in (model.register_forward_pre_hook(self._forward_pre_hook),
                           model.register_forward_hook(self._forward_hook, with_kwargs=True)):
                self._restore.append(handle.remove)
            self.mode = "forward_hook"
        return self.mode

    def _wrap(self, obj: Any, name: str, after: Callable[..., None],
              before: Callable[[], None] | None = None) -> None:
        original = getattr(obj, name)
        had_own = name in vars(obj)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before()  # cannot raise: a clock read
            result = original(*args, **kwargs)
            try:
                after(result, *args, **kwargs)
            except Exception as err:  # lossguard must never break the Trainer
                logger.warning("lossguard: capture failed in %s (%s)", name, err)
            return result

        setattr(obj, name, wrapper)

        def restore() -> None:
            if had_own:
                setattr(obj, name, original)
            else:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass

        self._restore.append(restore)

    def uninstall(self) -> None:
        while self._restore:
            self._restore.pop()()
        self.mode = "none"

    # --- observing ------------------------------------------------------------------------
    def _add_loss(self, loss: torch.Tensor) -> None:
        if loss.requires_grad:  # the Trainer hands back an already detached loss
            loss = loss.detach()
        if loss.dim() != 0 or loss.dtype != torch.float32:  # the usual 0-dim fp32 loss needs no work
            loss = loss.float().reshape(-1).mean()
        self._loss = loss if self._loss is None else self._loss + loss
        self._micro += 1

    def _add_tokens(self, inputs: Any) -> None:
        n = _token_source(inputs)
        if n is not None:
            self._tokens.append(n)
        if self._kept_rows < self.keep_rows and isinstance(inputs, dict):
            batch = {k: v.detach().cpu() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            rows = next((v.shape[0] for v in batch.values() if v.dim() > 0), 0)
            if rows:
                self.kept.append(batch)
                self._kept_rows += rows

    def _start_clock(self) -> None:
        """The step's clock starts with its first micro-batch (a batch already fetched, evaluations
        and checkpoint saves between steps not counted)."""
        if self._t0 is None:
            self._t0 = self._clock()

    def _after_training_step(self, result: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(result, torch.Tensor):
            self._add_loss(result)
        inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
        self._add_tokens(inputs)

    def _after_clip(self, result: Any, *args: Any, **kwargs: Any) -> None:
        max_norm = args[1] if len(args) > 1 else kwargs.get("max_norm")
        if self.grad_norm is None or max_norm == float("inf"):
            self.grad_norm = result if isinstance(result, torch.Tensor) or result is None else float(result)

    def _forward_pre_hook(self, module: Any, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._start_clock()

    def _forward_hook(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if isinstance(loss, torch.Tensor):
            # with num_items_in_batch the model already divides by the whole step's token count
            self._hook_losses = kwargs.get("num_items_in_batch") is None
            self._add_loss(loss)
            self._add_tokens(kwargs)

    # --- per step -------------------------------------------------------------------------
    def before_optimizer_step(self, model: Any, optimizer: Any) -> None:
        """Read the LR ``optimizer.step()`` is about to use; measure the grad norm if needed."""
        if optimizer is not None and getattr(optimizer, "param_groups", None):
            self.lr = float(optimizer.param_groups[0]["lr"])
        if self.grad_norm is None and model is not None:
            norm = grad_norm(model.parameters())
            if norm is not None:
                self.grad_norm = norm
                self.grad_norm_clipped = True

    def end_step(self) -> StepReading:
        """The step just finished; resets for the next. Its ``tokens`` are counted when ``int()``
        reads them (see ``TokenCount``)."""
        loss: float | None = None
        if self._loss is not None:
            total = self._loss
            if self._hook_losses and self._micro > 1:
                total = total / self._micro  # hooked model losses are per-micro-batch means
            loss = float(total)
        tokens = TokenCount(self._tokens) if self._tokens else None
        seconds = self._clock() - self._t0 if self._t0 is not None else None
        norm = self.grad_norm
        # a DTensor norm (FSDP2) may still be a per-shard partial: its full value is the norm
        out = StepReading(loss, tokens, None if norm is None else float(full_tensor(norm)), self.lr, seconds)
        self._loss = None
        self._tokens = []
        self._micro = 0
        self.grad_norm = None
        self._t0 = None
        return out

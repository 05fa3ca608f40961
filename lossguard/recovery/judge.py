"""The safety net's judge: a model state's loss on fixed evaluation batches, forward only.

``score_model(model, batches)`` is the whole measurement, reusable by any loop that holds a model
and batches (the Trainer callback, ``LoopGuard``, an FSDP loop that gathers its own): every module
in eval mode, no autograd, the RNG states and each module's mode put back after, gradients and
optimizer state never touched. It returns one unit per sequence where the model gives per-token
logits for its labels (a causal or seq2seq LM), else one per batch from the model's own loss,
with the number of target tokens as each unit's weight: the token-weighted mean over the units
is the loss the model reports on the batches, and the per-unit values let ``verdict.judge``
estimate the evaluation noise. The batches are the same every time: ``take_rows`` cuts the first
``n`` sequences out of the batches set aside at train begin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lossguard.recovery.snapshot import rng_state, set_rng_state
from lossguard.recovery.verdict import Scores

Batch = Mapping[str, Any]


def rows(batch: Batch) -> int:
    """Sequences in ``batch`` (the first dimension of its tensors; 0 without any)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def take_rows(batches: Sequence[Batch], n: int) -> list[dict[str, Any]]:
    """The first ``n`` sequences of ``batches``, in order, as CPU batches (the last one cut short)."""
    out: list[dict[str, Any]] = []
    left = n
    for batch in batches:
        if left <= 0:
            break
        k = rows(batch)
        if k == 0:
            continue
        take = min(k, left)
        out.append({key: (v[:take].detach().cpu() if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                    for key, v in batch.items()})
        left -= take
    return out


def _shift(model: Any) -> int:
    """1 for a causal LM (the logit at t predicts the label at t + 1), 0 for an encoder-decoder."""
    config = getattr(model, "config", None)
    return 0 if getattr(config, "is_encoder_decoder", False) else 1


@torch.no_grad()
def _batch_units(model: Any, batch: Batch, device: torch.device, shift: int) -> tuple[list[float], list[float]]:
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    labels = moved.get("labels")
    if not isinstance(labels, torch.Tensor):
        return [], []
    out = model(**moved)
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3 and labels.dim() == 2 \
            and logits.shape[:2] == labels.shape:
        losses, weights = [], []
        for row in range(labels.shape[0]):  # one row at a time: a float32 copy of one row's logits
            target = labels[row, shift:]
            n = int((target != -100).sum())
            if n == 0:
                losses.append(0.0)
                weights.append(0.0)
                continue
            pred = logits[row, : logits.shape[1] - shift].float()
            total = torch.nn.functional.cross_entropy(pred, target, ignore_index=-100, reduction="sum")
            losses.append(float(total) / n)
            weights.append(float(n))
        return losses, weights
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if not isinstance(loss, torch.Tensor):
        return [], []
    n = int((labels[..., shift:] != -100).sum()) if labels.dim() > 1 else int((labels != -100).sum())
    return [float(loss.float().mean())], [float(n)]


def score_model(model: Any, batches: Sequence[Batch]) -> Scores:
    """The model's loss on ``batches`` now, per unit (see the module docstring); changes nothing.

    Raises whatever the forward pass raises (out of memory, say): the caller decides what a
    failed measurement means.
    """
    modes = {m: m.training for m in model.modules()}
    rng = rng_state()
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    shift = _shift(model)
    losses: list[float] = []
    weights: list[float] = []
    try:
        model.eval()
        for batch in batches:
            batch_losses, batch_weights = _batch_units(model, batch, device, shift)
            losses.extend(batch_losses)
            weights.extend(batch_weights)
    finally:
        for module, was_training in modes.items():
            module.training = was_training
        set_rng_state(rng)
    return Scores.of(losses, weights)

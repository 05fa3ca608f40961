"""StepCapture's fallback when no Trainer is found: a forward hook on the model."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from lossguard.integrations.step_capture import StepCapture


class SlowLM(torch.nn.Module):
    """Returns ``.loss`` like a causal LM; each training forward takes at least 20 ms."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: float) -> SimpleNamespace:
        time.sleep(0.02)
        return SimpleNamespace(loss=(self.w * input_ids.float().mean() - target) ** 2)


def test_forward_hook_fallback_times_every_micro_batch_and_averages_the_loss():
    model = SlowLM()
    capture = StepCapture()
    assert capture.install(None, model) == "forward_hook"
    ids = torch.ones(2, 3, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    losses = []
    for target in (1.0, 4.0):  # two micro-batches of one optimizer step
        out = model(input_ids=ids, attention_mask=mask, target=target)
        out.loss.backward()
        losses.append(float(out.loss.detach()))
    capture.before_optimizer_step(model, SimpleNamespace(param_groups=[{"lr": 0.5}]))
    got = capture.end_step()
    loss, tokens, grad_norm, lr, seconds = got.loss, got.tokens, got.grad_norm, got.lr, got.seconds
    assert loss == pytest.approx(sum(losses) / 2)  # (2-1)^2 and (2-4)^2: 1 and 4, mean 2.5
    assert loss == pytest.approx(2.5)
    assert tokens == 10 and lr == 0.5
    assert grad_norm == pytest.approx(abs(2 * (2 - 1) + 2 * (2 - 4)))  # d/dw summed over both: 2 - 4
    assert capture.grad_norm_clipped  # measured from .grad before the step, i.e. after any clipping
    assert seconds is not None and seconds >= 0.04  # the clock starts before the first forward
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, target=0.0)  # evaluation: not part of any step
    assert capture.end_step().loss is None
    capture.uninstall()
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_the_clipped_norm_is_read_at_the_end_of_the_step_not_between_clipping_and_the_step():
    """On a GPU, reading the norm where clip_grad_norm_ returns it would make the device wait
    before the optimizer step; the capture keeps the tensor and reads it in end_step."""
    norms = iter([torch.tensor(3.5), torch.tensor(9.0), torch.tensor(0.25)])
    accelerator = SimpleNamespace(clip_grad_norm_=lambda params, max_norm: next(norms))
    trainer = SimpleNamespace(training_step=lambda model, inputs: torch.tensor(1.5), accelerator=accelerator)
    capture = StepCapture()
    assert capture.install(trainer, None) == "trainer"
    trainer.training_step(None, {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    returned = trainer.accelerator.clip_grad_norm_([], 1.0)
    assert capture.grad_norm is returned  # kept as it came, not read
    trainer.accelerator.clip_grad_norm_([], 1.0)  # a second clip (another model part): the first norm stays
    got = capture.end_step()
    assert (got.loss, got.tokens, got.grad_norm) == (1.5, 4, 3.5) and type(got.grad_norm) is float
    trainer.accelerator.clip_grad_norm_([], float("inf"))  # a measuring call (max_norm inf) is the norm
    assert capture.end_step().grad_norm == 0.25
    capture.uninstall()

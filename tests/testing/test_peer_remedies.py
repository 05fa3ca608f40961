"""The peer remedies of benchmarks/recovery.py act as their sources do, in a real Trainer: OLMo-core's
skip-step leaves the weights of a poisoned step untouched, ZClip clips an outlying gradient norm
below its z-score threshold, ReduceLROnPlateau cuts the LR the optimizer uses by 10x."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from lossguard.recovery.snapshot import trainable_parameters
from lossguard.testing.tiny import make_trainer, tiny_setup

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from peer_remedies import PlateauCut, SkipStep, ZClip  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


class Poison(TrainerCallback):
    """Every target token replaced by one symbol at the given steps: a real loss and gradient spike."""

    def __init__(self, steps):
        self.steps, self.current, self.handle = set(steps), 0, None

    def on_train_begin(self, args, state, control, model=None, **kw):
        def pre(module, a, kwargs):
            if self.current in self.steps and module.training:
                labels = kwargs["labels"].clone()
                labels[labels != -100] = 5
                kwargs["labels"] = labels
            return a, kwargs

        self.handle = model.register_forward_pre_hook(pre, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kw):
        self.current = state.global_step + 1

    def on_train_end(self, *a, **kw):
        self.handle.remove()


class Watch(TrainerCallback):
    """Weights after every step, the grad norm the optimizer steps with, the LR it uses."""

    def __init__(self):
        self.params, self.norms, self.lrs = {}, {}, {}

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        grads = [p.grad.norm() for p in model.parameters() if p.requires_grad and p.grad is not None]
        self.norms[state.global_step + 1] = float(torch.stack(grads).norm()) if grads else 0.0
        self.lrs[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, model=None, **kw):
        self.params[state.global_step] = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}


def test_skip_step_leaves_the_weights_of_a_poisoned_step_untouched(tmp_path):
    skip, watch = SkipStep(), Watch()
    make_trainer(tiny_setup(n_train=128), str(tmp_path), callbacks=[Poison([70]), skip, watch], max_steps=72,
                 learning_rate=1e-2, max_grad_norm=0.0).train()
    assert skip.skipped == [70]  # not before: 64 values seen first, then only the outlier
    for name, value in watch.params[69].items():
        assert torch.equal(watch.params[70][name], value), name
    assert any(not torch.equal(watch.params[71][n], v) for n, v in watch.params[70].items())
    assert 0.0 < watch.norms[71] <= 1.0 + 1e-6  # it clips to 1.0 itself, as the Trainer would have


def test_zclip_clips_an_outlying_gradient_norm(tmp_path):
    zclip, watch = ZClip(), Watch()
    make_trainer(tiny_setup(n_train=128), str(tmp_path), callbacks=[Poison([60]), zclip, watch], max_steps=61,
                 learning_rate=1e-2, max_grad_norm=0.0).train()
    assert zclip.clipped >= 1 and zclip.mean is not None
    typical = sorted(watch.norms[s] for s in range(30, 60))[15]
    assert watch.norms[60] <= 1.0 + 1e-6 and watch.norms[60] < 3 * typical  # clipped, and not to 1.0 alone


def test_plateau_cut_divides_the_lr_the_optimizer_uses_by_ten(tmp_path):
    cut, watch = PlateauCut(window=10), Watch()
    # the same 8 sequences every step and an LR too small to move them: a loss flat to 1e-6
    make_trainer(tiny_setup(n_train=8), str(tmp_path), callbacks=[cut, watch], max_steps=130,
                 learning_rate=1e-9, lr_scheduler_type="constant").train()
    # the best window is the first; torch's patience of 10 runs out at the 12th
    assert cut.cuts == [120]
    assert watch.lrs[120] == pytest.approx(1e-9) and watch.lrs[121] == pytest.approx(1e-10)

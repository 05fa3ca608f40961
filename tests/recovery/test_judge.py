"""The judge's measurement on a real LoRA model: the held-out loss, per unit, and nothing else changes."""

import random

import numpy as np
import pytest
import torch

from lossguard.recovery.judge import rows, score_model, take_rows
from lossguard.recovery.snapshot import trainable_parameters
from lossguard.testing.tiny import eval_loss, tiny_setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    return tiny_setup(n_train=64)


def _batches(setup, n=24, size=8):
    data = setup.eval[:n]
    return [setup.collator(data[i:i + size]) for i in range(0, n, size)]


def _train_a_little(setup, steps=3):
    model = setup.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = setup.collator(setup.train[:8])
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_per_sequence_units_give_exactly_the_models_held_out_loss(setup):
    _train_a_little(setup)
    batches = _batches(setup)
    scores = score_model(setup.model, batches)
    assert len(scores.losses) == 24 and scores.units == 24  # one unit per sequence
    assert scores.mean == pytest.approx(eval_loss(setup.model, setup.eval[:24], setup.collator, batch_size=8), rel=1e-5)
    # each unit is that sequence's own mean token loss, as the model computes it alone
    one = setup.collator(setup.eval[5:6])
    with torch.no_grad():
        setup.model.eval()
        alone = float(setup.model(**one).loss)
        setup.model.train()
    assert scores.losses[5] == pytest.approx(alone, rel=1e-5)
    assert scores.weights[5] == float((one["labels"][:, 1:] != -100).sum())
    assert score_model(setup.model, batches) == scores  # the same batches, the same scores


class LossOnly(torch.nn.Module):
    """A model that returns only its loss (no logits): one unit per batch."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **batch):
        return {"loss": self.inner(**batch).loss}


def test_without_logits_each_batch_is_one_unit(setup):
    batches = _batches(setup)
    scores = score_model(LossOnly(setup.model), batches)
    assert len(scores.losses) == 3
    assert scores.mean == pytest.approx(score_model(setup.model, batches).mean, rel=1e-5)


def test_scoring_leaves_rng_modes_gradients_and_optimizer_state_untouched(setup):
    model = setup.model
    opt = _train_a_little(setup)
    batch = setup.collator(setup.train[:8])
    model(**batch).loss.backward()  # gradients pending, as between backward and the optimizer step
    grads = {n: p.grad.clone() for n, p in trainable_parameters(model).items()}
    grad_objects = {n: p.grad for n, p in trainable_parameters(model).items()}
    opt_state = {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
                 for k, v in opt.state_dict()["state"].items()}
    params = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    # mixed modes: the model training, one block frozen in eval
    model.train()
    frozen = model.base_model.model.model.layers[0]
    frozen.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    seen = []

    def draws(module, args, kwargs):  # a model that draws random numbers in its forward
        seen.append(module.training)
        torch.rand(3)
        random.random()
        np.random.rand()

    handle = model.register_forward_pre_hook(draws, with_kwargs=True)
    try:
        torch.manual_seed(11)
        random.seed(11)
        np.random.seed(11)
        expect = (torch.rand(4), random.random(), np.random.rand())
        torch.manual_seed(11)
        random.seed(11)
        np.random.seed(11)
        scores = score_model(model, _batches(setup))
        after = (torch.rand(4), random.random(), np.random.rand())
    finally:
        handle.remove()
    assert seen == [False, False, False]  # every forward ran in eval mode
    assert torch.equal(after[0], expect[0]) and after[1:] == expect[1:]  # RNG streams as if never scored
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.is_grad_enabled()
    for n, p in trainable_parameters(model).items():
        assert p.grad is grad_objects[n] and torch.equal(p.grad, grads[n])
        assert torch.equal(p.detach(), params[n])
    state = opt.state_dict()["state"]
    for k, v in opt_state.items():
        for kk, vv in v.items():
            assert torch.equal(state[k][kk], vv) if torch.is_tensor(vv) else state[k][kk] == vv
    assert scores.units == 24
    frozen.train()
    model.zero_grad(set_to_none=True)


def test_modes_and_rng_are_put_back_when_the_forward_fails(setup):
    model = setup.model
    model.train()
    bad = [{"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(2, 5, dtype=torch.long)}]
    state = torch.get_rng_state()
    with pytest.raises(Exception):  # noqa: B017 - whatever the model raises on a malformed batch
        score_model(model, bad)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), state)


def test_take_rows_cuts_the_first_sequences():
    batches = [{"input_ids": torch.arange(12).view(4, 3), "labels": torch.arange(12).view(4, 3), "n": 4},
               {"input_ids": torch.arange(9).view(3, 3), "labels": torch.arange(9).view(3, 3), "n": 3}]
    taken = take_rows(batches, 6)
    assert [rows(b) for b in taken] == [4, 2]
    assert torch.equal(taken[1]["input_ids"], torch.arange(6).view(2, 3)) and taken[1]["n"] == 3
    assert [rows(b) for b in take_rows(batches, 100)] == [4, 3]
    assert take_rows(batches, 0) == [] and take_rows([], 5) == []

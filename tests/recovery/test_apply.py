"""Restoring a real LoRA model + AdamW in place, bitwise, and the exact LR override."""

import pytest
import torch
from transformers import get_scheduler

from lossguard.config import RecoveryConfig
from lossguard.recovery.apply import Recoverer, is_metric_driven
from lossguard.recovery.snapshot import trainable_parameters
from lossguard.testing.tiny import tiny_setup


@pytest.fixture(scope="module")
def setup():
    return tiny_setup(n_train=64)


def _train(model, opt, sched, batch, steps, metric_sched=False):
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        if metric_sched:
            sched.step(10.0)  # a metric that never improves: the plateau scheduler cuts the LR
        else:
            sched.step()
        opt.zero_grad()


def _fresh(setup, scheduler="linear"):
    model = setup.model
    with torch.no_grad():
        for n, p in trainable_parameters(model).items():
            torch.manual_seed(len(n))
            p.copy_(torch.randn_like(p) * 0.02)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    kwargs = {"scheduler_specific_kwargs": {"patience": 1, "factor": 0.5}} if scheduler == "reduce_lr_on_plateau" else {}
    sched = get_scheduler(scheduler, opt, num_warmup_steps=2, num_training_steps=40, **kwargs)
    return model, opt, sched, setup.collator(setup.train[:8])


def test_restore_is_bitwise_and_keeps_the_schedule_position(setup):
    model, opt, sched, batch = _fresh(setup)
    rec = Recoverer(model, opt, sched, config=RecoveryConfig(snapshot_every=1))
    _train(model, opt, sched, batch, 4)
    rec.snapshot(4, {"detector": 4})
    expect_params = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    expect_opt = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()}
    draw = torch.rand(3)
    _train(model, opt, sched, batch, 5)
    sched_before = sched.state_dict()
    lr_now = opt.param_groups[0]["lr"]
    snap = rec.restore(4)
    assert snap.engine == {"detector": 4}
    for n, p in trainable_parameters(model).items():
        assert torch.equal(p, expect_params[n]) and p.grad is None
    state = opt.state_dict()["state"]
    assert state.keys() == expect_opt.keys()
    for k in state:
        for kk in state[k]:
            assert torch.equal(state[k][kk], expect_opt[k][kk])
    assert sched.state_dict() == sched_before and opt.param_groups[0]["lr"] == lr_now  # position kept
    assert torch.equal(torch.rand(3), draw)  # RNG back to the snapshot's
    # the snapshot is not aliased by the optimizer: train on, restore again, same state
    _train(model, opt, sched, batch, 2)
    rec.restore(4)
    for n, p in trainable_parameters(model).items():
        assert torch.equal(p, expect_params[n])
    assert rec.last_rollback_seconds is not None and rec.last_rollback_seconds < 1.0


def test_reduce_lr_on_plateau_gets_its_state_and_lr_back(setup):
    model, opt, sched, batch = _fresh(setup, "reduce_lr_on_plateau")
    assert is_metric_driven(sched)
    rec = Recoverer(model, opt, sched)
    _train(model, opt, sched, batch, 2, metric_sched=True)
    rec.snapshot(2)
    lr_snap, sched_snap = opt.param_groups[0]["lr"], sched.state_dict()
    _train(model, opt, sched, batch, 6, metric_sched=True)
    assert opt.param_groups[0]["lr"] < lr_snap
    rec.restore(2)
    assert opt.param_groups[0]["lr"] == lr_snap and sched.state_dict() == sched_snap


def test_reset_optimizer_moments_starts_adam_afresh(setup):
    model, opt, sched, batch = _fresh(setup)
    rec = Recoverer(model, opt, sched, config=RecoveryConfig(reset_optimizer_moments=True))
    _train(model, opt, sched, batch, 2)
    rec.snapshot(2)
    _train(model, opt, sched, batch, 1)
    rec.restore(2)
    assert opt.state_dict()["state"] == {}


@pytest.mark.parametrize("name", ["linear", "cosine", "reduce_lr_on_plateau"])
def test_step_hooks_make_the_used_lr_exactly_factor_times_schedule(setup, name):
    model, opt, sched, batch = _fresh(setup, name)
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    kwargs = {"scheduler_specific_kwargs": {"patience": 1, "factor": 0.5}} if name == "reduce_lr_on_plateau" else {}
    reference = get_scheduler(name, reference_opt, num_warmup_steps=2, num_training_steps=40, **kwargs)
    rec = Recoverer(model, opt, sched)
    factors = [1.0, 0.1, 0.1, 0.25, 1.0, 0.5, 1.0, 0.1]
    current = {"m": 1.0}
    used = []
    remove = rec.install_step_hooks(lambda: current["m"])
    spy = opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    for m in factors:
        current["m"] = m
        expected = m * reference_opt.param_groups[0]["lr"]
        _train(model, opt, sched, batch, 1, metric_sched=name == "reduce_lr_on_plateau")
        if name == "reduce_lr_on_plateau":
            reference.step(10.0)
        else:
            reference_opt.step()
            reference.step()
        assert used[-1] == expected
        assert opt.param_groups[0]["lr"] == reference_opt.param_groups[0]["lr"]  # scheduler never sees it
    remove()
    spy.remove()


def _state(model, opt):
    return ({n: p.detach().clone() for n, p in trainable_parameters(model).items()},
            {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()})


def _assert_state(model, opt, state):
    params, opt_state = state
    for n, p in trainable_parameters(model).items():
        assert torch.equal(p, params[n]) and p.grad is None
    now = opt.state_dict()["state"]
    assert now.keys() == opt_state.keys()
    for k in now:
        for kk in now[k]:
            assert torch.equal(now[k][kk], opt_state[k][kk])


@pytest.mark.parametrize("memory_mb", [512.0, 1e-6])
def test_the_abandoned_head_is_kept_apart_and_reverted_to_bitwise(setup, tmp_path, memory_mb):
    model, opt, sched, batch = _fresh(setup)
    rec = Recoverer(model, opt, sched, config=RecoveryConfig(snapshot_memory_mb=memory_mb), spill_dir=tmp_path)
    _train(model, opt, sched, batch, 2)
    rec.snapshot(2, {"detector": 2})
    _train(model, opt, sched, batch, 3)
    rec.snapshot(5, {"detector": 5})
    _train(model, opt, sched, batch, 2)
    head_state = _state(model, opt)
    torch.manual_seed(5)
    draw = torch.rand(3)
    torch.manual_seed(5)
    head = rec.keep_head(7, {"detector": 7})
    assert rec.head is head and rec.ring.steps() == (2, 5)  # not a rollback target
    assert head.on_disk == (memory_mb < 1)  # past the memory cap it waits on disk, like a snapshot
    if head.on_disk:
        assert head.path.parent == tmp_path / "head"
    rec.restore(2)  # the rollback, then the recovered branch trains and snapshots
    _train(model, opt, sched, batch, 4)
    rec.snapshot(11, {"detector": 11})
    sched_position = sched.state_dict()["last_epoch"]
    back = rec.revert_to_head(abandon_after=2)
    assert back.engine == {"detector": 7} and back.step == 7
    _assert_state(model, opt, head_state)
    assert torch.equal(torch.rand(3), draw)  # RNG as at the moment of rolling back
    assert sched.state_dict()["last_epoch"] == sched_position  # the schedule keeps the global step's position
    assert rec.ring.steps() == (2,)  # the rejected branch's snapshot is gone
    assert rec.head is None and not (tmp_path / "head" / "step-000000007").exists()
    with pytest.raises(RuntimeError, match="no abandoned head"):
        rec.revert_to_head(2)


def test_a_kept_head_goes_into_a_checkpoint_and_comes_back(setup, tmp_path):
    model, opt, sched, batch = _fresh(setup)
    rec = Recoverer(model, opt, sched)
    _train(model, opt, sched, batch, 2)
    rec.snapshot(2)
    _train(model, opt, sched, batch, 2)
    head_state = _state(model, opt)
    rec.keep_head(4, {"detector": 4})
    path = rec.save_head(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "step-000000004"
    rec.restore(2)
    resumed = Recoverer(model, opt, sched)  # a new process resuming from that checkpoint
    resumed.snapshot(2)
    _train(model, opt, sched, batch, 1)
    head = resumed.load_head(path)
    assert head.step == 4 and head.engine == {"detector": 4}
    resumed.revert_to_head(abandon_after=2)
    _assert_state(model, opt, head_state)
    assert path.is_dir()  # the checkpoint's copy stays where the checkpoint is
    assert resumed.head is None and resumed.save_head(tmp_path / "other") is None


def test_dropping_the_head_frees_its_spilled_copy(setup, tmp_path):
    model, opt, sched, batch = _fresh(setup)
    rec = Recoverer(model, opt, sched, config=RecoveryConfig(snapshot_memory_mb=1e-6), spill_dir=tmp_path)
    _train(model, opt, sched, batch, 1)
    rec.snapshot(1)
    head = rec.keep_head(3)
    assert head.path.is_dir()
    rec.keep_head(4)  # a new trial's head replaces the old one
    assert not head.path.exists() and rec.head.step == 4
    rec.close()
    assert rec.head is None and list((tmp_path / "head").iterdir()) == []
    (tmp_path / "head" / "step-000000009").mkdir()  # a crashed run's head: removed by the next run
    Recoverer(model, opt, sched, spill_dir=tmp_path)
    assert list((tmp_path / "head").iterdir()) == []

"""The cost model and the snapshot cadence inside a real Trainer: records, preflight rows, and the
Trainer's checkpoints as rollback targets when snapshots are too costly to land near an onset."""


import pytest
import torch
from fault_inject import NanAt
from transformers import TrainerCallback

from lossguard import GuardConfig, LossGuard
from lossguard.recovery.snapshot import trainable_parameters
from lossguard.telemetry import read_events
from lossguard.testing.tiny import make_trainer, tiny_setup

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


class Weights(TrainerCallback):
    """The trainable weights right after each optimizer step (at its on_step_end, after LossGuard's)."""

    def __init__(self, steps):
        self.steps, self.kept = set(steps), {}

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step in self.steps:
            self.kept[state.global_step] = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}


def _records(out, kind):
    return [r for r in read_events(out / "lossguard" / "events.jsonl") if r.get("kind") == kind]


def test_the_cost_model_is_in_the_run_record_the_preflight_and_a_cost_record(tmp_path):
    setup = tiny_setup()
    guard = LossGuard(GuardConfig(console=False, gpu=False))
    make_trainer(setup, str(tmp_path), callbacks=[guard], max_steps=30, save_strategy="no").train()
    run = _records(tmp_path, "run")[0]
    n = sum(p.numel() for p in trainable_parameters(setup.model).values())
    assert run["cost"]["trainable_params"] == n
    assert run["cost"]["param_bytes"] == 4 * n and run["cost"]["optimizer_bytes"] == 8 * n
    assert run["cost"]["capture_bytes_per_s"] > 0
    pre = _records(tmp_path, "preflight")[0]
    names = [r["name"] for r in pre["rows"]]
    assert {"snapshot size", "snapshot copy", "host memory", "probe memory", "snapshot cadence"} <= set(names)
    (cost,) = _records(tmp_path, "cost")
    assert cost["step"] == 7 and cost["every"] == 50 and cost["cadence"]["reason"] == "default"
    assert 0 < cost["cadence"]["share"] < 0.01
    assert cost["line"].startswith("recovery costs ")


def test_costly_snapshots_fall_back_on_the_trainers_checkpoints(tmp_path):
    setup = tiny_setup()
    # a budget no snapshot fits: the cadence goes past the run, checkpoints every 10 steps serve
    cfg = GuardConfig(console=False, gpu=False, probe=False,
                      recovery={"snapshot_budget": 1e-7, "rollback_steps": 10, "safety_net": False,
                                "max_low_lr_steps": 5, "relapse_watch_steps": 0})
    guard = LossGuard(cfg)
    spy = Weights({20})
    trainer = make_trainer(setup, str(tmp_path), callbacks=[guard, NanAt([33]), spy], max_steps=45,
                           save_strategy="steps", save_steps=10, save_total_limit=1)
    rolled = {}

    class AtRollback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 33:  # after LossGuard's hook rolled back at the NaN
                rolled.update({n: p.detach().clone() for n, p in trainable_parameters(model).items()})

    trainer.add_callback(AtRollback())
    trainer.train()
    cost = _records(tmp_path, "cost")[0]
    assert cost["cadence"]["reason"] == "checkpoints" and cost["cadence"]["use_checkpoints"]
    assert "checkpoints (every 10 steps)" in cost["line"]
    (rollback,) = [a for a in _records(tmp_path, "action") if a["action"] == "rollback"]
    assert rollback["to_step"] == 20  # the newest checkpoint at least 10 steps before the NaN at 33
    assert not (tmp_path / "checkpoint-20").exists()  # rotated away: the pinned links kept it
    for name, value in spy.kept[20].items():
        assert torch.equal(rolled[name], value), name
    assert all(torch.isfinite(p).all() for p in trainable_parameters(setup.model).values())

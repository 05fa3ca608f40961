"""Recovery inside a real Trainer on a real peft LoRA model: NaN in, exact rollback and LR, pinning, resume."""

import json
import math
from pathlib import Path

import pytest
import torch
from fault_inject import NanAt
from safetensors.torch import load_file
from transformers import TrainerCallback, get_scheduler

from lossguard import GuardConfig, LossGuard
from lossguard.recovery.snapshot import trainable_parameters, unwrap
from lossguard.telemetry import read_events
from lossguard.testing.tiny import eval_loss, make_trainer, tiny_setup

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


class Spy(TrainerCallback):
    """Copies trainable state at chosen steps (after LossGuard's hooks) and records each step's LR."""

    def __init__(self, keep=()):
        self.keep = set(keep)
        self.kept = {}
        self.used = []
        self.sched_lr = []

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        self.opt, self.sched = unwrap(optimizer), unwrap(lr_scheduler)

        def pre(opt, a, k):
            self.used.append(opt.param_groups[0]["lr"])

        self.handle = self.opt.register_step_pre_hook(pre)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.sched_lr.append(self.sched.get_last_lr()[0])

    def on_step_end(self, args, state, control, model=None, **kw):
        guard = getattr(self, "guard", None)
        if guard is not None and guard.recovery is not None and guard.recovery.recoverer is not None:
            self.ring_steps = guard.recovery.recoverer.ring.steps()  # the snapshots held at the last step
        if state.global_step in self.keep:
            self.kept[state.global_step] = {
                "params": {n: p.detach().clone() for n, p in trainable_parameters(model).items()},
                "opt": {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in self.opt.state_dict()["state"].items()},
                "sched": dict(self.sched.state_dict()),
                "lr": self.opt.param_groups[0]["lr"],
            }

    def on_train_end(self, *a, **kw):
        self.handle.remove()


def _actions(out: Path, kind=None):
    recs = [r for r in read_events(out / "lossguard" / "events.jsonl") if r["kind"] == "action"]
    return [r for r in recs if kind is None or r["action"] == kind]


def _guard(**recovery) -> LossGuard:
    base = {"snapshot_every": 5, "rollback_steps": 10, "max_low_lr_steps": 8, "relapse_watch_steps": 0}
    base.update(recovery)
    return LossGuard(GuardConfig(console=False, recovery=base))


def test_nan_is_rolled_back_bitwise_and_training_ends_finite(tmp_path):
    tiny = tiny_setup(n_train=128)
    spy = Spy(keep=(10, 22))
    guard = _guard()
    spy.guard = guard
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[guard, spy, NanAt([22])], max_steps=40,
                           learning_rate=1e-2, logging_steps=10)
    trainer.train()
    rollback = _actions(tmp_path, "rollback")
    assert [(r["step"], r["from_step"], r["to_step"], r["reason"]) for r in rollback] == [(22, 22, 10, "nonfinite")]
    assert "data loader keeps moving" in rollback[0]["message"] and rollback[0]["details"]["data_replayed"] is False
    at_snap, after = spy.kept[10], spy.kept[22]
    for name, value in at_snap["params"].items():
        assert torch.equal(after["params"][name], value)  # bitwise, right after the rollback
    assert after["opt"].keys() == at_snap["opt"].keys()
    for k, state in at_snap["opt"].items():
        for kk, v in state.items():
            assert torch.equal(after["opt"][k][kk], v)
    # the scheduler keeps its position: the global step went on counting
    assert after["sched"]["last_epoch"] == 22 and at_snap["sched"]["last_epoch"] == 10
    assert after["sched"]["base_lrs"] == at_snap["sched"]["base_lrs"]
    assert [a["action"] for a in _actions(tmp_path)][:2] == ["rollback", "lr_override"]
    assert any(a["action"] == "lr_restore" for a in _actions(tmp_path))
    assert trainer.state.global_step == 40
    assert all(torch.isfinite(p).all() for p in trainable_parameters(tiny.model).values())
    assert math.isfinite(eval_loss(tiny.model, tiny.eval, tiny.collator))
    assert spy.ring_steps[:3] == (0, 5, 10)  # nothing of the abandoned branch kept
    assert len(guard.recovery.recoverer.ring) == 0  # and train end freed them


SCHEDULERS = {
    "linear": {}, "cosine": {}, "cosine_with_restarts": {"num_cycles": 2}, "polynomial": {"power": 2.0},
    "constant": {}, "constant_with_warmup": {}, "inverse_sqrt": {},
    "reduce_lr_on_plateau": {"mode": "max", "patience": 0, "factor": 0.5},  # every eval cuts the LR
    "cosine_with_min_lr": {"min_lr_rate": 0.1}, "warmup_stable_decay": {"num_decay_steps": 10},
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_used_lr_is_factor_times_schedule_then_the_schedule(tmp_path, name):
    tiny = tiny_setup(n_train=128)
    ramp = 3 if name in ("linear", "warmup_stable_decay") else 0
    spy = Spy()
    guard = _guard(restore_ramp_steps=ramp, lr_factor=0.2)
    steps, warmup = 36, 4
    plateau = name == "reduce_lr_on_plateau"
    extra = {"eval_strategy": "steps", "eval_steps": 6} if plateau else {}
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[guard, spy, NanAt([16])], max_steps=steps,
                           learning_rate=1e-2, lr_scheduler_type=name, warmup_steps=warmup,
                           lr_scheduler_kwargs=SCHEDULERS[name], logging_steps=50, **extra)
    trainer.train()
    if plateau:  # its schedule is what it decided from the evaluations: the LR it holds
        schedule = list(spy.sched_lr)
        assert len(set(schedule)) >= 3
    else:
        ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
        ref = get_scheduler(name, ref_opt, num_warmup_steps=warmup, num_training_steps=steps,
                            scheduler_specific_kwargs=SCHEDULERS[name] or None)
        schedule = []
        for _ in range(steps):
            schedule.append(ref_opt.param_groups[0]["lr"])
            ref_opt.step()
            ref.step()
    restore = _actions(tmp_path, "lr_restore")
    assert [a["step"] for a in _actions(tmp_path, "rollback")] == [16] and len(restore) == 1
    r = restore[0]["step"]
    assert r > 16

    def multiplier(step: int) -> float:
        if step <= 16:
            return 1.0
        if step <= r:
            return 0.2
        return 0.2 + 0.8 * min(1.0, (step - r) / ramp) if ramp else 1.0

    assert len(spy.used) == steps
    for i, used in enumerate(spy.used):
        step = i + 1
        if multiplier(step) == 1.0:
            assert used == schedule[i], (step, used, schedule[i])
        else:
            assert used == schedule[i] * multiplier(step), (step, used, schedule[i])
        assert spy.sched_lr[i] == schedule[i]  # the scheduler itself never saw the override
    lrs = {r["step"]: r["lr"] for r in read_events(tmp_path / "lossguard" / "events.jsonl") if r["kind"] == "sample"}
    assert [lrs[s] for s in range(1, steps + 1)] == spy.used  # telemetry shows the LR really used


def test_a_run_that_triggers_forever_gives_up_after_the_budget(tmp_path):
    tiny = tiny_setup(n_train=128)
    guard = _guard(max_rollbacks=2, on_give_up="stop")
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[guard, NanAt(range(12, 200))], max_steps=60,
                           learning_rate=1e-2, logging_steps=50)
    trainer.train()
    kinds = [a["action"] for a in _actions(tmp_path) if a["action"] in ("rollback", "give_up")]
    assert kinds == ["rollback", "rollback", "give_up"]
    assert [a["step"] for a in _actions(tmp_path, "rollback")] == [12, 13]
    assert trainer.state.global_step == 14  # stopped at the give-up
    gave_up = [r for r in read_events(tmp_path / "lossguard" / "events.jsonl")
               if r["kind"] == "finding" and r["reason"] == "gave_up"]
    assert len(gave_up) == 1 and gave_up[0]["severity"] == "critical" and "2 rollback(s)" in gave_up[0]["message"]


def test_pinned_fallback_survives_save_total_limit_one(tmp_path):
    tiny = tiny_setup(n_train=128)
    spy = Spy(keep=(10,))
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[_guard(), spy, NanAt([24])], max_steps=60,
                           learning_rate=1e-2, logging_steps=50, save_strategy="steps", save_steps=10,
                           save_total_limit=1)
    trainer.train()
    (pinned,) = tmp_path.glob("lossguard-fallback-*")
    assert pinned.is_dir() and (pinned / "lossguard_state.json").is_file()
    # named after the step its trainer_state.json holds; its note says which state it started from
    saved_at = json.loads((pinned / "trainer_state.json").read_text())["global_step"]
    assert pinned.name == f"lossguard-fallback-{saved_at}" and saved_at >= 24
    note = json.loads((pinned / "lossguard_fallback.json").read_text())
    assert (note["step"], note["restored_from_step"]) == (saved_at, 10)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-60"]  # rotation still works
    weights = load_file(str(pinned / "adapter_model.safetensors"))
    assert len(weights) == len(spy.kept[10]["params"])
    for name, value in spy.kept[10]["params"].items():
        key = name.replace(".default", "")
        assert torch.equal(weights[key], value)  # it holds the pre-anomaly state
    saves = [a for a in _actions(tmp_path, "save") if a["details"].get("path")]
    assert saves and saves[0]["details"]["path"] == str(pinned)


def test_pinned_fallback_takes_a_free_name_when_an_earlier_run_left_its_own(tmp_path, caplog):
    """A second run into the same output_dir (the demo run twice) must not fail on the names the
    first run's fallback checkpoints took, nor change the first run's fallback."""

    def run(out):  # a fresh model each time, as a rerun of the demo has: the same trajectory
        trainer = make_trainer(tiny_setup(n_train=128), str(out), callbacks=[_guard(), NanAt([24])], max_steps=40,
                               learning_rate=1e-2, logging_steps=50, save_strategy="steps", save_steps=10)
        trainer.train()

    run(tmp_path)
    (first,) = [p.name for p in tmp_path.glob("lossguard-fallback-*")]
    kept = {f.name: f.read_bytes() for f in (tmp_path / first).iterdir() if f.is_file()}
    with caplog.at_level("WARNING", logger="lossguard"):
        run(tmp_path)  # the plain name is taken now
        run(tmp_path)  # and the "-2" one too
    names = sorted(p.name for p in tmp_path.glob("lossguard-fallback-*"))
    assert names == sorted([first, first + "-2", first + "-3"])
    assert all((tmp_path / n / "adapter_model.safetensors").is_file() for n in names)
    assert "failed" not in caplog.text
    # the pin is a hard-linked copy of checkpoint-24, which the later runs saved again: the
    # Trainer rewrites files in place, so they must no longer share the pin's inodes
    assert {f.name: f.read_bytes() for f in (tmp_path / first).iterdir() if f.is_file()} == kept
    pin_inodes = {f.stat().st_ino for f in (tmp_path / first).iterdir() if f.is_file()}
    assert not pin_inodes & {f.stat().st_ino for f in (tmp_path / "checkpoint-24").iterdir() if f.is_file()}


def test_resume_keeps_lossguard_state(tmp_path):
    tiny = tiny_setup(n_train=128)
    first = _guard()
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[first, NanAt([14])], max_steps=30, learning_rate=1e-2,
                           logging_steps=50, save_strategy="steps", save_steps=30)
    trainer.train()
    assert first.engine.policy.rollbacks == 1
    saved = json.loads((tmp_path / "checkpoint-30" / "lossguard_state.json").read_text())
    assert saved["policy"]["rollbacks"] == 1

    second = _guard()
    tiny2 = tiny_setup(n_train=128)
    trainer2 = make_trainer(tiny2, str(tmp_path), callbacks=[second], max_steps=40, learning_rate=1e-2,
                            logging_steps=50, save_strategy="no")
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-30"))
    resumed = [r for r in read_events(tmp_path / "lossguard" / "events.jsonl") if r["kind"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["rollbacks"] == 1 and resumed[0]["step"] == 30
    assert second.engine.policy.rollbacks == 1
    assert second.engine.detectors.state_dict()["samples_seen"] == saved["detectors"]["samples_seen"] + 10
    # a resumed run continues the same log: both runs' records are there, nothing was set aside
    runs = [r for r in read_events(tmp_path / "lossguard" / "events.jsonl") if r["kind"] == "run"]
    assert len(runs) == 2 and list((tmp_path / "lossguard").glob("events.*.jsonl")) == []


def test_users_notes_arguments_still_find_a_target_100_steps_back(tmp_path):
    tiny = tiny_setup(n_train=128)
    guard = LossGuard(GuardConfig(console=False))  # default recovery: every 50 steps, 100 steps back
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[guard, NanAt([160])], max_steps=170,
                           learning_rate=1e-2, save_strategy="steps", save_steps=200, logging_steps=20)
    trainer.train()
    rollback = _actions(tmp_path, "rollback")
    assert [(r["from_step"], r["to_step"]) for r in rollback] == [(160, 50)]
    assert rollback[0]["from_step"] - rollback[0]["to_step"] >= 100
    assert not list(tmp_path.glob("checkpoint-*"))[:0]  # no Trainer checkpoint was needed for the target

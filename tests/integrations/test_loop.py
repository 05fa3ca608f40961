"""``LoopGuard`` in a real hand-written loop over the tiny peft LoRA model: NaN in, exact recovery out."""

import json
import math
import random

import pytest
import torch
from transformers import get_scheduler

from lossguard import GuardConfig
from lossguard.integrations.loop import LoopGuard
from lossguard.records import ActionKind
from lossguard.recovery.snapshot import trainable_parameters
from lossguard.telemetry import read_events
from lossguard.testing.tiny import eval_loss, tiny_setup

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _config(**recovery) -> GuardConfig:
    base = {"snapshot_every": 5, "rollback_steps": 10, "max_low_lr_steps": 8, "lr_factor": 0.25,
            "relapse_watch_steps": 0}
    base.update(recovery)
    return GuardConfig(console=False, recovery=base)


def _loop(tmp_path, order: str, steps: int = 40, nan_at: int = 17):
    setup = tiny_setup(n_train=128)
    model = setup.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=steps)
    guard = LoopGuard(model, opt, sched, config=_config(), log_dir=tmp_path / "lossguard", max_steps=steps)
    used: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    kept: dict[int, dict[str, torch.Tensor]] = {}
    rng = random.Random(0)
    for step in range(1, steps + 1):
        loss = model(**setup.collator(rng.sample(setup.train, 8))).loss
        if step == nan_at:
            loss = loss * float("nan")
        loss.backward()
        if order == "before":
            result = guard.step(loss)
            if step == 6:  # called before the update: the state after 5 updates, snapshot "5"
                kept[5] = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if order == "after":
            result = guard.step(loss)
        if step == 5 and order == "after":
            kept[5] = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
        if result.rolled_back_to is not None:
            kept["after_rollback"] = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    guard.close()
    return setup, guard, used, kept


@pytest.mark.parametrize("order", ["after", "before"])
def test_loop_recovers_a_nan_with_exact_state_and_lr(tmp_path, order):
    steps = 40
    setup, guard, used, kept = _loop(tmp_path, order, steps)
    rollbacks = [a for a in guard.actions if a.action is ActionKind.ROLLBACK]
    assert [(a.from_step, a.to_step) for a in rollbacks] == [(17, 5)]
    for name, value in kept[5].items():
        assert torch.equal(kept["after_rollback"][name], value)
    assert all(torch.isfinite(p).all() for p in trainable_parameters(setup.model).values())
    assert math.isfinite(eval_loss(setup.model, setup.eval, setup.collator))
    restore = next(a for a in guard.actions if a.action is ActionKind.LR_RESTORE).step
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    ref = get_scheduler("cosine", ref_opt, num_warmup_steps=3, num_training_steps=steps)
    shift = 0 if order == "after" else -1  # called before optimizer.step(), a decision applies to that step
    for i, lr in enumerate(used):
        step = i + 1 - shift
        low = 17 < step <= restore
        expected = ref_opt.param_groups[0]["lr"] * 0.25 if low else ref_opt.param_groups[0]["lr"]
        assert lr == expected, (i, lr, expected)
        ref_opt.step()
        ref.step()
    events = list(read_events(tmp_path / "lossguard" / "events.jsonl"))
    kinds = [r["action"] for r in events if r["kind"] == "action"]
    assert kinds[:2] == ["rollback", "lr_override"] and "lr_restore" in kinds
    samples = [r for r in events if r["kind"] == "sample"]
    assert len(samples) == steps and isinstance(samples[16]["loss"], str)  # NaN written as "nan"
    if order == "after":
        assert [s["lr"] for s in samples] == used  # telemetry shows the LR really used
    assert events[-1]["kind"] == "end"


def test_loop_guard_state_round_trip(tmp_path):
    setup, guard, _, _ = _loop(tmp_path, "after", steps=24)
    state = json.loads(json.dumps(guard.state_dict()))
    opt = torch.optim.AdamW([p for p in setup.model.parameters() if p.requires_grad], lr=1e-2)
    clone = LoopGuard(setup.model, opt, config=_config())
    clone.load_state_dict(state)
    for key in ("detectors", "policy"):
        assert clone.state_dict()["engine"][key] == guard.state_dict()["engine"][key]
    assert clone.engine.policy.rollbacks == 1 and clone.global_step == 24
    clone.close()


def test_close_reports_what_the_last_held_back_steps_show(tmp_path):
    """The detectors run every 10 steps; a spike in the last, unfinished batch is still found,
    logged before the run's end record, when the guard closes."""
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = LoopGuard(model, opt, config=GuardConfig(console=False, recovery={"enabled": False}),
                      log_dir=tmp_path / "lossguard")  # no planned length: no plateau judged
    rng = random.Random(0)
    for step in range(1, 96):
        guard.step(9.0 if step == 93 else 2.0 + rng.gauss(0, 0.01))
    assert guard.findings == [] and [s.step for s in guard.engine.pending] == [91, 92, 93, 94, 95]
    guard.close()
    assert [(f.reason.value, f.step) for f in guard.findings] == [("spike", 93)]
    kinds = [(r["kind"], r.get("reason")) for r in read_events(tmp_path / "lossguard" / "events.jsonl")]
    assert kinds[-2:] == [("finding", "spike"), ("end", None)]


def _force(guard: LoopGuard, reason, at: dict[int, int]) -> None:
    from lossguard.records import Finding, Severity

    observe = guard.engine.detectors.observe

    def forced(sample):
        found = observe(sample)
        if sample.step in at:
            found.append(Finding(reason, Severity.WARNING, sample.step, at[sample.step], "forced", detector="test"))
        return found

    guard.engine.detectors.observe = forced


@pytest.mark.parametrize("given", [True, False])
def test_loop_safety_net_reverts_a_false_alarm_to_the_head(tmp_path, given):
    from lossguard.records import Reason

    setup = tiny_setup(n_train=128)
    model = setup.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=40)
    judge = [setup.collator(setup.eval[i:i + 8]) for i in range(0, 32, 8)] if given else None
    config = _config(judge_sequences=32, lr_factor=0.1, max_low_lr_steps=40)
    guard = LoopGuard(model, opt, sched, config=config, log_dir=tmp_path / "lossguard", max_steps=40,
                      judge_batches=judge)
    _force(guard, Reason.EARLY_CONVERGENCE, {20: 20})  # the whole trial at 0.1 x the LR: behind the head
    rng = random.Random(0)
    head = None
    for step in range(1, 41):
        model(**setup.collator(rng.sample(setup.train, 8))).loss.backward()
        loss = model(**setup.collator(rng.sample(setup.train, 8))).loss.detach()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step == 20:
            head = ({n: p.detach().clone() for n, p in trainable_parameters(model).items()},
                    {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()})
        result = guard.step(loss)
        if step == 30:
            assert [a.action.value for a in result.actions][:1] == ["revert"]
            for n, p in trainable_parameters(model).items():
                assert torch.equal(p, head[0][n])
            for k, v in opt.state_dict()["state"].items():
                for kk, vv in v.items():
                    assert torch.equal(vv, head[1][k][kk])
    guard.close()
    revert = [r for r in read_events(tmp_path / "lossguard" / "events.jsonl")
              if r["kind"] == "action" and r["action"] == "revert"]
    assert len(revert) == 1 and revert[0]["details"]["units"] == 32
    assert revert[0]["details"]["false_alarm"] == "early_convergence"
    assert guard.judge.rows == 32
    if not given:  # the first 32 training sequences the model saw, kept by a hook that is gone now
        assert guard._rows.kept and guard._rows._handle is None

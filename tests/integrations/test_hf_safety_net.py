"""The safety net in a real Trainer on a real peft LoRA model: a false alarm is reverted bitwise,
a genuine recovery is kept, a checkpoint taken mid-trial resumes into the same verdict."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from lossguard import GuardConfig, LossGuard
from lossguard.records import Finding, Reason, Severity
from lossguard.recovery.snapshot import trainable_parameters, unwrap
from lossguard.telemetry import read_events
from lossguard.testing.tiny import eval_loss, make_trainer, tiny_setup

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


class Forced(TrainerCallback):
    """Makes the guard's detectors report ``reason`` at chosen steps (onset ``onset``): a rollback
    triggered at a chosen step, on a run that is healthy (a false alarm) or broken."""

    def __init__(self, guard: LossGuard, reason: Reason, at: dict[int, int]):
        self.guard, self.reason, self.at = guard, reason, at

    def on_train_begin(self, args, state, control, **kw):
        detectors = self.guard.engine.detectors
        observe = detectors.observe

        def forced(sample):
            found = observe(sample)
            if sample.step in self.at:
                found.append(Finding(self.reason, Severity.WARNING, sample.step, self.at[sample.step],
                                     f"forced {self.reason.value} at {sample.step}", detector="test"))
            return found

        detectors.observe = forced


class Poison(TrainerCallback):
    """Replaces every target token by one symbol for the given steps: real damage to the adapter."""

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


class Spy(TrainerCallback):
    """The trainable state, optimizer state and RNG after chosen steps (after LossGuard acted), and every LR used."""

    def __init__(self, keep=(), stop_at=None):
        self.keep, self.kept, self.used, self.stop_at = set(keep), {}, [], stop_at

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        self.opt = unwrap(optimizer)
        self.handle = self.opt.register_step_pre_hook(lambda o, a, k: self.used.append(o.param_groups[0]["lr"]))

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step in self.keep:
            self.kept[state.global_step] = {
                "params": {n: p.detach().clone() for n, p in trainable_parameters(model).items()},
                "opt": {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in self.opt.state_dict()["state"].items()},
                "rng": torch.get_rng_state(),
            }
        if state.global_step == self.stop_at:
            control.should_training_stop = True

    def on_train_end(self, *a, **kw):
        self.handle.remove()


def _guard(**recovery) -> LossGuard:
    base = {"snapshot_every": 5, "rollback_steps": 10, "max_low_lr_steps": 40, "relapse_watch_steps": 0,
            "judge_sequences": 32}
    base.update(recovery)
    return LossGuard(GuardConfig(console=False, recovery=base, probe={"enabled": False}))


def _actions(out, kind=None):
    recs = [r for r in read_events(out / "lossguard" / "events.jsonl") if r["kind"] == "action"]
    return [r for r in recs if kind is None or r["action"] == kind]


def _assert_same_state(got, want):
    for name, value in want["params"].items():
        assert torch.equal(got["params"][name], value), name
    assert got["opt"].keys() == want["opt"].keys()
    for k, state in want["opt"].items():
        for kk, v in state.items():
            assert torch.equal(got["opt"][k][kk], v)
    assert torch.equal(got["rng"], want["rng"])


def test_a_false_alarm_is_reverted_to_the_abandoned_head_bitwise(tmp_path):
    # the run that never rolled back (the same schedule): its state after step 20
    plain = Spy(keep=(20,), stop_at=20)
    make_trainer(tiny_setup(n_train=128), str(tmp_path / "plain"), callbacks=[plain], max_steps=60,
                 learning_rate=1e-2, logging_steps=50).train()

    tiny = tiny_setup(n_train=128)
    guard = _guard()
    spy = Spy(keep=(30,))
    # a plateau "found" on a healthy run: the whole trial runs at 0.1 x the LR, behind the head
    forced = Forced(guard, Reason.EARLY_CONVERGENCE, {20: 20, 45: 45})
    trainer = make_trainer(tiny, str(tmp_path / "run"), callbacks=[guard, forced, spy], max_steps=60,
                           learning_rate=1e-2, logging_steps=50)
    trainer.train()
    out = tmp_path / "run"
    rollback, = _actions(out, "rollback")
    assert (rollback["step"], rollback["to_step"]) == (20, 10)
    assert rollback["details"]["verdict_step"] == 30 and rollback["details"]["head_score"] > 0
    revert, = _actions(out, "revert")
    assert (revert["step"], revert["to_step"], revert["reason"]) == (30, 20, "early_convergence")
    det = revert["details"]
    assert det["head_score"] == pytest.approx(rollback["details"]["head_score"])
    assert det["branch_score"] > det["head_score"] and det["gain"] < 0 and det["equal_compute"]
    assert det["units"] == 32 and det["false_alarm"] == "early_convergence" and det["stderr"] > 0
    assert "early_convergence findings start no recovery" in revert["message"]
    # right after the revert the run holds exactly the state the run without lossguard had at step 20
    _assert_same_state(spy.kept[30], plain.kept[20])
    # the LR: 0.1 x schedule from the rollback to the revert, then the schedule itself
    assert not _actions(out, "lr_restore")
    sched = [1e-2 * (1 - i / 60) for i in range(60)]
    for i, used in enumerate(spy.used):
        factor = 0.1 if 20 <= i < 30 else 1.0
        assert used == pytest.approx(sched[i] * factor, rel=1e-6), i + 1
    # the second false alarm (step 45) is reported but starts nothing
    assert len(_actions(out, "rollback")) == 1 and guard.engine.policy.false_alarms == ["early_convergence"]
    assert [f.step for f in guard.findings if f.detector == "test"] == [20, 45]
    assert trainer.state.global_step == 60 and guard.recovery.recoverer.head is None
    assert math.isfinite(eval_loss(tiny.model, tiny.eval, tiny.collator))


def test_a_genuine_recovery_from_poisoned_batches_is_kept(tmp_path):
    tiny = tiny_setup(n_train=128)
    guard = _guard()
    forced = Forced(guard, Reason.SPIKE, {28: 21})
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[guard, forced, Poison(range(21, 29))], max_steps=60,
                           learning_rate=1e-2, logging_steps=50)
    trainer.train()
    rollback, = _actions(tmp_path, "rollback")  # the spike detector itself, or the forced finding at 28
    step = rollback["step"]
    assert 21 < step <= 28 and rollback["to_step"] == 10 and rollback["details"]["verdict_step"] == 2 * step - 10
    keep, = _actions(tmp_path, "keep")
    assert keep["step"] == 2 * step - 10 and keep["details"]["head_step"] == step
    det = keep["details"]
    assert det["gain"] == pytest.approx(det["head_score"] - det["branch_score"], rel=1e-6)
    assert det["gain"] > det["z"] * det["stderr"] > 0  # the poisoned head loses by far more than the noise
    assert not _actions(tmp_path, "revert") and guard.engine.policy.false_alarms == []
    assert guard.recovery.recoverer.head is None  # freed once the verdict kept the recovery


def test_a_stalled_run_rolled_back_is_kept(tmp_path):
    """At lr 0.1 the adapter is knocked to the uniform-prediction loss and stays there; rolled back to
    the start and trained at a tenth of it, it learns: the stall's recovery is kept."""
    tiny = tiny_setup(n_train=128)
    guard = _guard(max_low_lr_steps=300)
    forced = Forced(guard, Reason.EARLY_CONVERGENCE, {40: 10})
    make_trainer(tiny, str(tmp_path), callbacks=[guard, forced], max_steps=100, learning_rate=1e-1,
                 logging_steps=50, lr_scheduler_type="constant").train()
    # (the stall at the unigram level is found on its own, before the forced finding at step 40)
    rollback = _actions(tmp_path, "rollback")[0]
    assert rollback["to_step"] == 0 and rollback["details"]["head_score"] > 2.5  # stuck near ln(20) = 3.0
    keep = _actions(tmp_path, "keep")[0]
    assert keep["step"] == 2 * rollback["step"]  # judged after as many steps as were discarded
    assert keep["details"]["branch_score"] < keep["details"]["head_score"] - 0.3


def test_a_checkpoint_taken_mid_trial_resumes_into_the_same_revert(tmp_path):
    plain = Spy(keep=(20,), stop_at=20)
    make_trainer(tiny_setup(n_train=128), str(tmp_path / "plain"), callbacks=[plain], max_steps=40,
                 learning_rate=1e-2, logging_steps=50).train()

    out = tmp_path / "run"
    first = _guard()
    stop = Spy(stop_at=24)  # the first process ends mid-trial (and judges at its end)
    forced = Forced(first, Reason.EARLY_CONVERGENCE, {20: 20})
    make_trainer(tiny_setup(n_train=128), str(out), callbacks=[first, forced, stop],
                 max_steps=40, learning_rate=1e-2, logging_steps=50).train()
    pinned = out / "lossguard-fallback-20"  # the save the rollback (to step 10) asked for, at step 20
    assert (pinned / "lossguard_head" / "step-000000020").is_dir()

    second = _guard()
    spy = Spy(keep=(30,))
    trainer = make_trainer(tiny_setup(n_train=128), str(out), callbacks=[second, spy], max_steps=40,
                           learning_rate=1e-2, logging_steps=50)
    trainer.train(resume_from_checkpoint=str(pinned))
    resumed = [r for r in read_events(out / "lossguard" / "events.jsonl") if r["kind"] == "resume"]
    assert resumed and resumed[-1]["step"] == 20
    revert = [a for a in _actions(out, "revert") if a["step"] == 30]
    assert len(revert) == 1 and revert[0]["to_step"] == 20
    _assert_same_state(spy.kept[30], plain.kept[20])


# every detector's bar at (or near) its floor: a healthy run raises false alarms on its own
OVER_SENSITIVE = {"spike_sigmas": 1.5, "spike_min_rise": 0.0, "spike_tail_factor": 0.0, "min_history": 10,
                  "divergence_window": 10, "divergence_probability": 0.6, "divergence_min_rise": 0.01,
                  "plateau_min_steps": 20, "plateau_z": 0.5, "plateau_min_drop": 0.0,
                  "stall_z": 0.5, "stall_rate": 0.01, "stall_min_improvement": 0.5, "early_fraction": 0.9}


def test_real_false_alarms_of_over_sensitive_detection_are_reverted_and_shown_everywhere(tmp_path, capsys):
    """No forced finding: the detectors themselves misfire on a healthy run. The first rollback is
    reverted to the plain run's state bitwise, the verdict names both scores and the false alarm,
    and the console, the dashboard, the HTML report and ``watch --once --json`` all show it."""
    import io
    import json

    from rich.console import Console
    from typer.testing import CliRunner

    from lossguard.cli import _register, app
    from lossguard.presentation.dashboard import render
    from lossguard.presentation.report import render_html
    from lossguard.watch.live import read_run

    steps = 90
    plain = Spy(keep=range(1, steps + 1))
    make_trainer(tiny_setup(n_train=128), str(tmp_path / "plain"), callbacks=[plain], max_steps=steps,
                 learning_rate=1e-2, logging_steps=50).train()

    guard = LossGuard(GuardConfig(detection=OVER_SENSITIVE, probe={"enabled": False},
                                  recovery={"snapshot_every": 5, "rollback_steps": 10, "max_low_lr_steps": 40,
                                            "judge_sequences": 32, "precheck": False}))  # the trials themselves
    spy = Spy(keep=range(1, steps + 1))
    out = tmp_path / "run"
    trainer = make_trainer(tiny_setup(n_train=128), str(out), callbacks=[guard, spy], max_steps=steps,
                           learning_rate=1e-2, logging_steps=50)
    trainer.train()
    assert trainer.state.global_step == steps
    detected = {f.reason.value for f in guard.findings if f.detector != "recovery"}
    rollbacks, reverts = _actions(out, "rollback"), _actions(out, "revert")
    assert rollbacks and reverts, (detected, [a["action"] for a in _actions(out)])
    first, revert = rollbacks[0], reverts[0]
    # the first verdict judges the first rollback: its head is the plain run's state at that step
    assert revert["details"]["head_step"] == first["step"] == revert["to_step"]
    assert revert["step"] == first["details"]["verdict_step"] == 2 * first["step"] - first["to_step"]
    _assert_same_state(spy.kept[revert["step"]], plain.kept[first["step"]])
    det = revert["details"]
    assert det["head_score"] == pytest.approx(first["details"]["head_score"])
    assert det["branch_score"] - det["head_score"] == pytest.approx(-det["gain"], rel=1e-6)
    assert det["gain"] <= det["z"] * det["stderr"] and det["units"] == 32 and det["equal_compute"]
    assert det["false_alarm"] == first["reason"] and det["false_alarm"] in guard.engine.policy.false_alarms
    assert f"{first['reason']} findings start no recovery for the rest of the run" in revert["message"]
    # a reverted reason never rolls back again
    later = [r for r in rollbacks if r["step"] > revert["step"]]
    assert all(r["reason"] not in guard.engine.policy.false_alarms[:1] for r in later)

    console = capsys.readouterr().err
    assert f"lossguard action revert reverted the {first['reason']} rollback at step {revert['step']}" in console
    live = read_run(out)
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None, force_terminal=False).print(render(live, width=120, now=0))
    kept = len(_actions(out, "keep"))
    assert f"kept {kept}  reverted {len(reverts)}" in buf.getvalue()
    page = render_html(live)
    assert f"<td>verdicts on rollbacks</td><td>kept {kept}, reverted {len(reverts)}</td>" in page
    assert f"rollback reverted ({len(reverts)})" in page  # the chart's legend, one entry per verdict kind
    assert kept == 0 or f"recovery kept ({kept})" in page
    _register()
    result = CliRunner().invoke(app, ["watch", str(out), "--once", "--json"])
    doc = json.loads(result.output)
    verdicts = [v for v in doc["verdicts"] if v["verdict"] == "revert"]
    assert len(verdicts) == len(reverts)
    assert verdicts[0]["head_score"] == pytest.approx(det["head_score"])
    assert verdicts[0]["branch_score"] == pytest.approx(det["branch_score"])
    assert verdicts[0]["false_alarm"] == first["reason"]


def test_a_false_alarm_the_held_out_loss_contradicts_is_declined_changes_nothing_and_is_shown(tmp_path, capsys):
    """A forced spike on a healthy run: the head beats the snapshot before the spike on the judge's
    sequences, so the rollback is declined. The run ends bitwise where the plain run ends, the
    finding is info (the run stays healthy), and every view shows the decline."""
    import io
    import json

    from rich.console import Console
    from typer.testing import CliRunner

    from lossguard.cli import _register, app
    from lossguard.presentation.dashboard import render
    from lossguard.presentation.report import render_html
    from lossguard.watch.live import read_run

    steps = 40
    plain = Spy(keep=(steps,))
    make_trainer(tiny_setup(n_train=128), str(tmp_path / "plain"), callbacks=[plain], max_steps=steps,
                 learning_rate=1e-2, logging_steps=50).train()
    guard = LossGuard(GuardConfig(probe={"enabled": False},
                                  recovery={"snapshot_every": 5, "rollback_steps": 10, "judge_sequences": 32}))
    spy = Spy(keep=(steps,))
    out = tmp_path / "run"
    make_trainer(tiny_setup(n_train=128), str(out), callbacks=[guard, Forced(guard, Reason.SPIKE, {20: 6}), spy],
                 max_steps=steps, learning_rate=1e-2, logging_steps=50).train()
    decline, = _actions(out)
    assert (decline["action"], decline["step"], decline["to_step"]) == ("decline", 20, 5)
    det = decline["details"]
    assert det["check_step"] == 5 and det["target_step"] == 0 and det["units"] == 32
    assert det["gain"] == pytest.approx(det["check_score"] - det["head_score"], rel=1e-6) and det["gain"] > det["threshold"]
    _assert_same_state(spy.kept[steps], plain.kept[steps])
    forced = next(f for f in guard.findings if f.message.startswith("forced"))
    assert forced.severity is Severity.INFO and forced.evidence["precheck"]["check_step"] == 5
    assert guard.recovery.recoverer.head is None and guard.engine.policy.false_alarms == []

    console = capsys.readouterr().err
    assert "lossguard action decline declined the spike rollback to step 0" in console
    live = read_run(out)
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None, force_terminal=False).print(render(live, width=120, now=0))
    assert "declined 1" in buf.getvalue() and "NORMAL" in buf.getvalue()
    page = render_html(live)
    assert "<td>verdicts on rollbacks</td><td>-, declined 1</td>" in page and "rollback declined (1)" in page
    _register()
    doc = json.loads(CliRunner().invoke(app, ["watch", str(out), "--once", "--json"]).output)
    assert doc["status"] == "healthy"
    verdict, = doc["verdicts"]
    assert (verdict["verdict"], verdict["check_step"], verdict["head_step"]) == ("decline", 5, 20)

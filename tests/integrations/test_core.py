"""The integration core both guards call: the reporter (log and console), the gradient norm, carrying out a decision,
and finding the checkpoint a Trainer run resumed from."""

import math

import pytest
import torch
from transformers import TrainerState

from lossguard import GuardConfig
from lossguard.guard import Guard
from lossguard.integrations.core import Applied, Reporter, apply_decision, carry_out, grad_norm
from lossguard.integrations.hf_recovery import resumed_checkpoint
from lossguard.records import Action, ActionKind, Finding, Reason, Sample, Severity
from lossguard.recovery.apply import Recoverer
from lossguard.recovery.policy import Decision
from lossguard.telemetry import read_events


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_grad_norm_is_the_global_norm_of_the_gradients_and_none_without_any():
    model, _ = _model()
    assert grad_norm(model.parameters()) is None
    model(torch.randn(5, 4)).sum().backward()
    expected = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    norm = grad_norm(model.parameters())
    assert isinstance(norm, torch.Tensor) and float(norm) == pytest.approx(expected, rel=1e-6)


def test_a_rollback_restores_the_snapshot_and_its_detector_memory_and_times_the_rollback_action():
    model, opt = _model()
    rec = Recoverer(model, opt)
    engine = Guard(GuardConfig(console=False))
    for step in range(1, 6):
        engine.observe(Sample(step=step, loss=2.0 - 0.1 * step))
    assert apply_decision(Decision(), rec, engine, 5) == Applied()  # no snapshot yet: one is due
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    seen = engine.detectors.state_dict()["samples_seen"]
    for step in range(6, 9):
        _train_step(model, opt)
        engine.observe(Sample(step=step, loss=1.0))
    assert engine.detectors.state_dict()["samples_seen"] == seen + 3
    # the rollback action need not come first: it is found by its kind
    actions = [Action(ActionKind.LR_OVERRIDE, 8, "lr"), Action(ActionKind.ROLLBACK, 8, "back", to_step=5)]
    done = apply_decision(Decision(actions=actions, rollback_to=5, save=True), rec, engine, 8)
    assert done == Applied(rolled_back_to=5, save=True, stop=False)
    assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())
    assert engine.detectors.state_dict()["samples_seen"] == seen
    assert "restore_seconds" in actions[1].details and "restore_seconds" not in actions[0].details
    assert actions[1].details["restore_seconds"] >= 0


def test_a_damaged_state_is_never_snapshotted_and_the_stop_flag_is_passed_on():
    model, opt = _model()
    rec = Recoverer(model, opt)
    engine = Guard(GuardConfig(console=False))
    apply_decision(Decision(), rec, engine, 0)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert apply_decision(Decision(snapshot=True, stop=True), rec, engine, 50) == Applied(stop=True)
    assert rec.ring.steps() == (0,)
    assert apply_decision(Decision(stop=True), None, engine, 51) == Applied(stop=True)  # recovery off


def test_the_reporter_sets_an_earlier_run_aside_appends_on_resume_and_writes_only_on_the_main_rank(tmp_path):
    config = GuardConfig(console=False)
    first = Reporter(config)
    first.open(tmp_path, resumed=False)
    first.write("run", start_step=0)
    first.close(3)
    resumed = Reporter(config)
    resumed.open(tmp_path, resumed=True)
    finding = Finding(Reason.SPIKE, Severity.WARNING, 7, 7, "loss 9 > 3 at step 7")
    rollback = Action(ActionKind.ROLLBACK, 7, "back", to_step=5)
    decision = Decision(actions=[rollback], findings=[finding])
    assert carry_out(decision, resumed, None, None, 7) == Applied()
    resumed.close(8)
    kinds = [r["kind"] for r in read_events(tmp_path / "events.jsonl")]
    assert kinds == ["run", "end", "finding", "action", "end"]
    assert resumed.findings == [finding] and resumed.actions == [rollback] and resumed.rollbacks() == 1
    fresh = Reporter(config)
    fresh.open(tmp_path, resumed=False)
    fresh.close(0)
    assert len(list(tmp_path.glob("events.*.jsonl"))) == 1  # the two earlier sessions, kept aside
    other_rank = Reporter(config, is_main=False)
    other_rank.open(tmp_path / "rank1", resumed=False)
    other_rank.emit(finding)
    other_rank.close(1)
    assert other_rank.findings == [finding] and not (tmp_path / "rank1").exists()


def _checkpoint(path, step: int, log_history: list) -> None:
    path.mkdir(parents=True)
    TrainerState(global_step=step, log_history=log_history).save_to_json(str(path / "trainer_state.json"))


def test_the_resumed_checkpoint_is_the_one_whose_trainer_state_the_trainer_loaded(tmp_path):
    out = tmp_path / "run"
    history = [{"loss": 2.5, "step": 10}, {"grad_norm": float("nan"), "step": 20}]
    _checkpoint(out / "checkpoint-30", 30, history[:1])  # another branch of the run saved at step 30 too
    _checkpoint(out / "lossguard-fallback-10", 30, history)  # the pinned fallback, saved at step 30
    _checkpoint(out / "checkpoint-20", 20, history[:1])
    args = type("Args", (), {"output_dir": str(out), "resume_from_checkpoint": None})()
    loaded = TrainerState.load_from_json(str(out / "lossguard-fallback-10" / "trainer_state.json"))
    assert resumed_checkpoint(args, loaded) == out / "lossguard-fallback-10"  # NaN in its history too
    loaded = TrainerState.load_from_json(str(out / "checkpoint-30" / "trainer_state.json"))
    assert resumed_checkpoint(args, loaded) == out / "checkpoint-30"
    assert resumed_checkpoint(args, TrainerState(global_step=0)) is None  # a fresh run
    elsewhere = tmp_path / "old-run" / "checkpoint-40"
    _checkpoint(elsewhere, 40, [])
    args.resume_from_checkpoint = str(elsewhere)  # named in TrainingArguments, outside output_dir
    assert resumed_checkpoint(args, TrainerState.load_from_json(str(elsewhere / "trainer_state.json"))) == elsewhere

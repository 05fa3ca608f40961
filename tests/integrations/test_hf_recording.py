"""The callback on real Trainer runs: one sample per optimizer step, exact loss, LR, NaN kept."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from lossguard import GuardConfig, LossGuard, Sample
from lossguard.telemetry import read_events
from lossguard.testing.tiny import make_trainer

pytestmark = pytest.mark.slow


def _records(out_dir, kind):
    return [r for r in read_events(out_dir / "lossguard" / "events.jsonl") if r["kind"] == kind]


def _guard() -> LossGuard:
    return LossGuard(GuardConfig(console=False, recovery={"enabled": False}))


class _RecordInputs(TrainerCallback):
    """Independent of lossguard: keeps every training micro-batch via a forward pre-hook."""

    def __init__(self):
        self.batches: list[dict[str, torch.Tensor]] = []
        self.step_of: list[int] = []
        self.step = 0
        self.lrs: list[float] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        def pre_hook(module, args, kwargs):
            if module.training and torch.is_grad_enabled():
                self.batches.append({k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask", "labels")})
                self.step_of.append(self.step)

        model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        original = optimizer.step

        def step(*a, **k):  # the LR optimizer.step() really uses
            self.lrs.append(optimizer.param_groups[0]["lr"])
            return original(*a, **k)

        optimizer.step = step

    def on_step_end(self, args, state, control, **kw):
        self.step += 1


def test_one_sample_per_step_with_accumulation_and_exact_losses(tiny, tmp_path):
    spy = _RecordInputs()
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[_guard(), spy], max_steps=6,
                           gradient_accumulation_steps=4, per_device_train_batch_size=4, learning_rate=0.0)
    trainer.train()
    samples = [Sample.from_record(r) for r in _records(tmp_path, "sample")]
    assert [s.step for s in samples] == [1, 2, 3, 4, 5, 6]
    assert len(spy.batches) == 24  # 6 steps x 4 micro-batches

    # lr=0 keeps the model fixed, so each step's loss can be recomputed from its micro-batches:
    # the token-weighted mean over all supervised tokens of the step
    model = tiny.model
    model.eval()
    with torch.no_grad():
        for step in range(6):
            total, count = 0.0, 0
            for batch, owner in zip(spy.batches, spy.step_of):
                if owner != step:
                    continue
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
                ce = torch.nn.functional.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.size(-1)).float(), shift_labels.reshape(-1),
                    ignore_index=-100, reduction="sum")
                total += float(ce)
                count += int((shift_labels != -100).sum())
            assert samples[step].loss == pytest.approx(total / count, rel=1e-5)
            assert samples[step].tokens == sum(int(b["attention_mask"].sum())
                                               for b, o in zip(spy.batches, spy.step_of) if o == step)
    assert all(s.grad_norm is not None and s.grad_norm > 0 for s in samples)
    assert all(s.step_time_s is not None and s.step_time_s > 0 for s in samples)


def test_losses_match_the_trainer_log_and_lr_is_what_the_optimizer_used(tiny, tmp_path):
    spy = _RecordInputs()
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[_guard(), spy], max_steps=12, logging_steps=1,
                           learning_rate=1e-2, warmup_steps=3, lr_scheduler_type="cosine", max_grad_norm=0.5)
    trainer.train()
    samples = [Sample.from_record(r) for r in _records(tmp_path, "sample")]
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert len(samples) == 12 == len(logged)
    for s in samples:
        assert s.loss == pytest.approx(logged[s.step]["loss"], rel=1e-6)
        # grad_norm is measured before clipping (the Trainer logs the same pre-clip value)
        assert s.grad_norm == pytest.approx(logged[s.step]["grad_norm"], rel=1e-5)
    assert any(s.grad_norm > 0.5 for s in samples)  # clipping was active, the norm is still pre-clip
    assert [s.lr for s in samples] == pytest.approx(spy.lrs, rel=1e-12)
    assert samples[0].lr < samples[2].lr  # warmup, then cosine decay
    run = _records(tmp_path, "run")[0]
    assert run["max_steps"] == 12 and run["trainable_params"] == 16384 and run["capture"] == "trainer"
    assert run["effective_batch_size"] == 8 and run["world_size"] == 1
    assert _records(tmp_path, "end")[0]["step"] == 12


class _PoisonAt(TrainerCallback):
    """Makes the forward pass produce NaN at one optimizer step by corrupting a LoRA weight."""

    def __init__(self, step: int):
        self.step = step
        self.saved = None

    def on_step_begin(self, args, state, control, model=None, **kw):
        param = next(p for n, p in model.named_parameters() if "lora_A" in n)
        if state.global_step + 1 == self.step:
            self.saved = param.detach().clone()
            with torch.no_grad():
                param.fill_(float("nan"))
        elif self.saved is not None:
            with torch.no_grad():
                param.copy_(self.saved)
            self.saved = None


def test_nan_loss_is_recorded_not_filtered(tiny, tmp_path):
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[_guard(), _PoisonAt(4)], max_steps=6,
                           learning_rate=1e-3, logging_steps=3, max_grad_norm=0.0)
    trainer.train()
    losses = {s.step: s.loss for s in (Sample.from_record(r) for r in _records(tmp_path, "sample"))}
    assert math.isnan(losses[4])
    assert all(math.isfinite(losses[k]) for k in (1, 2, 3))
    # the Trainer's own log hides it (logging_nan_inf_filter): that is why lossguard records per step
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_the_users_training_arguments_run_with_lossguard(tiny, tmp_path):
    args = dict(per_device_train_batch_size=2, gradient_accumulation_steps=8, num_train_epochs=3,
                learning_rate=2e-4, logging_steps=20, save_steps=200, report_to="none", max_steps=-1,
                save_strategy="steps")
    tiny.train = tiny.train[:96]  # 3 epochs of 6 steps: the notes' arguments on a small dataset
    guard = _guard()
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[guard], **args)
    trainer.train()
    samples = _records(tmp_path, "sample")
    assert [r["step"] for r in samples] == list(range(1, 19))
    assert all(r["lr"] <= 2e-4 for r in samples)
    run = _records(tmp_path, "run")[0]
    assert run["effective_batch_size"] == 16 and run["logging_steps"] == 20 and run["save_steps"] == 200


def test_unwritable_output_dir_warns_and_training_continues(tiny, tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    guard = LossGuard(GuardConfig(console=False, recovery={"enabled": False}), log_dir=blocker / "lossguard")
    trainer = make_trainer(tiny, str(tmp_path / "out"), callbacks=[guard], max_steps=3)
    with caplog.at_level("WARNING", logger="lossguard"):
        result = trainer.train()
    assert result.global_step == 3
    assert "telemetry disabled" in caplog.text


def test_a_fresh_run_in_a_used_output_dir_sets_the_old_log_aside(tiny, tmp_path, caplog):
    make_trainer(tiny, str(tmp_path), callbacks=[_guard()], max_steps=5).train()
    with caplog.at_level("WARNING", logger="lossguard"):
        make_trainer(tiny, str(tmp_path), callbacks=[_guard()], max_steps=3).train()
    assert [r["step"] for r in _records(tmp_path, "sample")] == [1, 2, 3]  # only the new run
    (old,) = (tmp_path / "lossguard").glob("events.*.jsonl")
    kept = [r for r in read_events(old) if r["kind"] == "sample"]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5]  # the earlier run, whole
    assert f"kept it as {old.name}" in caplog.text


def test_bad_configuration_fails_loudly_before_training():
    with pytest.raises(ValueError, match=r"lr_factor=0.0 is out of range"):
        LossGuard(recovery={"lr_factor": 0.0})
    with pytest.raises(ValueError, match="spike_window"):
        LossGuard(detection={"spike_window": 2})


class _ReporterSpy(TrainerCallback):
    """Stands in for TensorBoard/W&B: a reporting callback registered before LossGuard."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def test_lossguard_figures_reach_the_reporting_callbacks(tiny, tmp_path):
    spy = _ReporterSpy()
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[spy, _guard(), _PoisonAt(3)], max_steps=10,
                           logging_steps=5, learning_rate=1e-3, max_grad_norm=0.0)
    trainer.train()
    assert [round(log["epoch"], 4) for log in spy.logs] == [round(5 / 64, 4), round(10 / 64, 4)]
    losses = {r["step"]: Sample.from_record(r).loss for r in _records(tmp_path, "sample")}
    for log, steps in zip(spy.logs, (range(1, 6), range(6, 11))):
        assert log["lossguard/nonfinite_steps"] == sum(1.0 for k in steps if not math.isfinite(losses[k]))
    assert not math.isfinite(losses[3]) and spy.logs[0]["lossguard/nonfinite_steps"] >= 1.0
    assert spy.logs[0]["lossguard/findings"] >= 1.0  # the NaN at step 3 was reported
    assert spy.logs[0]["lossguard/grad_norm_max"] > 0

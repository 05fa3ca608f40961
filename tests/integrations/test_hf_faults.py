"""Faults injected into real Trainer runs: full and refusing disks, kills at named points, resumes,
two callbacks. lossguard's own failures must never take the training down."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fault_inject import DieAt, NanAt, file_size_limit
from transformers import TrainerCallback

from lossguard import GuardConfig, LossGuard
from lossguard.recovery.snapshot import unwrap
from lossguard.telemetry import read_events
from lossguard.testing.tiny import make_trainer, tiny_setup

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _run_script(out: Path, scenario: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    return subprocess.run([sys.executable, str(HERE / "fault_run.py"), str(out), scenario], capture_output=True,
                          text=True, timeout=300, env=env)


def _guard(**recovery) -> LossGuard:
    base = {"snapshot_every": 5, "rollback_steps": 10, "max_low_lr_steps": 8, "relapse_watch_steps": 0}
    base.update(recovery)
    return LossGuard(GuardConfig(console=False, recovery=base))


def _records(log: Path, kind: str) -> list[dict]:
    return [r for r in read_events(log) if r["kind"] == kind]


def test_a_full_disk_fails_the_rollback_save_but_not_the_training(tmp_path, caplog):
    """No file may grow past 96 KiB: the Trainer's save of the checkpoint lossguard asked for
    after its rollback fails writing optimizer.pt (EFBIG). It used to raise into training."""
    guard = _guard()
    trainer = make_trainer(tiny_setup(n_train=128), str(tmp_path), callbacks=[guard, NanAt([24])], max_steps=40,
                           learning_rate=1e-2, logging_steps=50)
    with caplog.at_level("WARNING", logger="lossguard"), file_size_limit(96 << 10):
        trainer.train()
    assert trainer.state.global_step == 40 and guard.engine.policy.rollbacks == 1
    failed = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(failed) == 1 and "step 24" in failed[0]  # torch.save says RuntimeError, not OSError
    refused = [r.getMessage() for r in caplog.records if "no checkpoint asked for" in r.getMessage()]
    assert len(refused) == 1 and "step 29" in refused[0]  # the LR restore's save: not asked for again
    assert not (tmp_path / "checkpoint-24").exists()  # the half-written checkpoint is gone
    assert not list(tmp_path.glob("lossguard-fallback-*"))  # and nothing pinned in its place
    log = tmp_path / "lossguard" / "events.jsonl"
    actions = [(a["step"], a["action"]) for a in _records(log, "action")]
    assert (24, "rollback") in actions and any(a == "lr_restore" for _, a in actions)
    assert _records(log, "end")[0]["step"] == 40


def test_a_full_disk_fails_the_snapshot_spill_once_and_no_save_is_asked_for(tmp_path, caplog):
    """safetensors raises SafetensorError (not an OSError) on a full disk: the spill used to abort
    the hook, leave a .tmp folder and lose the rollback's records."""
    guard = _guard(snapshot_memory_mb=0.6)  # three snapshots in memory, older ones spill to disk
    trainer = make_trainer(tiny_setup(n_train=128), str(tmp_path), callbacks=[guard, NanAt([24])], max_steps=40,
                           learning_rate=1e-2, logging_steps=50)
    with caplog.at_level("WARNING", logger="lossguard"), file_size_limit(96 << 10):
        trainer.train()
    assert trainer.state.global_step == 40 and guard.engine.policy.rollbacks == 1
    spill = [r.getMessage() for r in caplog.records if "cannot write snapshot" in r.getMessage()]
    assert len(spill) == 1 and "SafetensorError" in spill[0]  # said once, not once per step
    refused = [r.getMessage() for r in caplog.records if "no checkpoint asked for" in r.getMessage()]
    assert len(refused) == 1 and "step 24" in refused[0]
    assert "failed" not in caplog.text
    snapshots = tmp_path / "lossguard" / "snapshots"
    assert not list(snapshots.glob(".tmp-step-*")) and not list(snapshots.glob("step-*"))
    assert not list(tmp_path.glob("checkpoint-*"))
    log = tmp_path / "lossguard" / "events.jsonl"
    assert [a["action"] for a in _records(log, "action")][:2] == ["rollback", "lr_override"]
    assert any(a["action"] == "lr_restore" for a in _records(log, "action"))


@pytest.mark.parametrize("refusing", ["log", "output_dir"])
def test_no_save_is_asked_for_where_the_disk_refuses_writes(tmp_path, caplog, refusing):
    """The output directory replaced by a file once the Trainer is built (refused for root too):
    the Trainer is not asked for a checkpoint it would fail to write."""
    out = tmp_path / "out"
    log_dir = None if refusing == "log" else tmp_path / "logs"
    guard = LossGuard(GuardConfig(console=False, recovery={"snapshot_every": 5, "rollback_steps": 10,
                                                             "max_low_lr_steps": 8, "relapse_watch_steps": 0}),
                      log_dir=log_dir)
    trainer = make_trainer(tiny_setup(n_train=128), str(out), callbacks=[guard, NanAt([24])], max_steps=40,
                           learning_rate=1e-2, logging_steps=50)
    out.rmdir()
    out.write_text("a file where the output directory was")
    with caplog.at_level("WARNING", logger="lossguard"):
        trainer.train()
    assert trainer.state.global_step == 40
    assert [(a.step, a.action.value) for a in guard.actions][:2] == [(24, "rollback"), (24, "lr_override")]
    lines = [r.getMessage() for r in caplog.records if "no checkpoint asked for" in r.getMessage()]
    assert len(lines) == 1 and "step 24" in lines[0]
    assert ("refused a write" if refusing == "log" else "refused a test write") in lines[0]
    assert "failed" not in caplog.text
    if refusing == "output_dir":
        assert [a["action"] for a in _records(log_dir / "events.jsonl", "action")][:2] == ["rollback", "lr_override"]


class LrSpy(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.used = {}
        self.state = state
        unwrap(optimizer).register_step_pre_hook(lambda opt, a, k: self.used.__setitem__(
            self.state.global_step + 1, opt.param_groups[0]["lr"]))


def test_a_second_lossguard_switches_itself_off(tmp_path, caplog):
    tiny = tiny_setup(n_train=128)
    first, second, spy = _guard(), _guard(), LrSpy()
    trainer = make_trainer(tiny, str(tmp_path), callbacks=[first, second, spy, NanAt([24])], max_steps=30,
                           learning_rate=1e-2, logging_steps=50, lr_scheduler_type="constant")
    with caplog.at_level("WARNING", logger="lossguard"):
        trainer.train()
    warned = [r.getMessage() for r in caplog.records if "second one is switched off" in r.getMessage()]
    assert len(warned) == 1
    assert second.engine is None and second.report.writer is None and not second.actions
    assert [a.action.value for a in first.actions][:2] == ["rollback", "lr_override"]
    assert spy.used[24] == pytest.approx(1e-2) and spy.used[25] == pytest.approx(1e-3)  # cut once: 0.1x, not 0.01x
    log = tmp_path / "lossguard" / "events.jsonl"
    assert len(_records(log, "run")) == 1 and not list(log.parent.glob("events.*.jsonl"))  # nothing set aside
    assert len(_records(log, "action")) == len(first.actions)


def test_a_kill_right_after_trainer_state_json_still_resumes_lossguards_state(tmp_path, caplog):
    """kill -9 right after the Trainer wrote checkpoint-20/trainer_state.json, mid-recovery (LR at
    0.1x since the rollback at step 14): lossguard's state went in first, so the resume goes on
    at 0.1x. Without it, the resume says so in one line and counts the log's rollbacks."""
    proc = _run_script(tmp_path, "kill_after_trainer_state")
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = tmp_path / "checkpoint-20"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "lossguard_state.json").is_file()
    assert json.loads((ckpt / "lossguard_state.json").read_text())["policy"]["phase"] == "low_lr"

    def resume(out: Path) -> LossGuard:
        guard = _guard(max_low_lr_steps=30)
        trainer = make_trainer(tiny_setup(n_train=128), str(out), callbacks=[guard], max_steps=24,
                               learning_rate=1e-2, logging_steps=50, save_strategy="no")
        trainer.train(resume_from_checkpoint=True)
        return guard

    bare = tmp_path.parent / (tmp_path.name + "-without-state")
    shutil.copytree(tmp_path, bare)
    (bare / "checkpoint-20" / "lossguard_state.json").unlink()
    with caplog.at_level("WARNING", logger="lossguard"):
        guard = resume(tmp_path)
    assert "holds no lossguard_state.json" not in caplog.text
    (resumed,) = _records(tmp_path / "lossguard" / "events.jsonl", "resume")
    assert (resumed["step"], resumed["phase"], resumed["rollbacks"]) == (20, "low_lr", 1)
    assert guard.engine.lr_multiplier(21) == pytest.approx(0.1)

    caplog.clear()
    with caplog.at_level("WARNING", logger="lossguard"):
        guard = resume(bare)
    lines = [r.getMessage() for r in caplog.records if "holds no lossguard_state.json" in r.getMessage()]
    assert len(lines) == 1
    assert "1 rollback(s) the log shows counted" in lines[0] and "0.1 x schedule since step 14" in lines[0]
    (resumed,) = _records(bare / "lossguard" / "events.jsonl", "resume")
    assert resumed["state"] == "missing" and resumed["rollbacks"] == 1 and guard.engine.policy.rollbacks == 1


def test_a_resume_into_a_stretch_lossguard_abandoned_says_so_and_readers_drop_the_dead_branch(tmp_path, caplog):
    """Killed right after the rollback at step 24 (to step 10), before its checkpoint:
    resume_from_checkpoint=True picks checkpoint-20, inside the abandoned stretch. The resume says
    so; watch/report/analysis show the resumed run, not the dead branch's rollback at 24."""
    guard = _guard()
    trainer = make_trainer(tiny_setup(n_train=128), str(tmp_path), callbacks=[guard, NanAt([24]), DieAt(24)],
                           max_steps=30, learning_rate=1e-2, logging_steps=50, save_strategy="steps", save_steps=10)
    with pytest.raises(SystemExit):
        trainer.train()
    guard.report.writer.close()  # what the writer thread does within 50 ms (and no thread left behind)
    assert [(a.step, a.action.value, a.to_step) for a in guard.actions][0] == (24, "rollback", 10)

    resumed = _guard()
    trainer = make_trainer(tiny_setup(n_train=128), str(tmp_path), callbacks=[resumed], max_steps=30,
                           learning_rate=1e-2, logging_steps=50, save_strategy="no")
    with caplog.at_level("WARNING", logger="lossguard"):
        trainer.train(resume_from_checkpoint=True)
    lines = [r.getMessage() for r in caplog.records if "had abandoned" in r.getMessage()]
    assert len(lines) == 1
    assert "from checkpoint-20" in lines[0] and "at step 24 it rolled back to step 10 (nonfinite)" in lines[0]
    assert "no checkpoint of the recovered state was saved" in lines[0]
    log = tmp_path / "lossguard" / "events.jsonl"
    (record,) = _records(log, "resume")
    assert record["abandoned"]["step"] == 24 and record["abandoned"]["to_step"] == 10
    assert any(r["kind"] == "action" and r["step"] == 24 for r in read_events(log))  # the log keeps everything

    from lossguard.analysis import analyze
    from lossguard.telemetry import open_run
    from lossguard.watch.live import read_run

    for name, log_view in (("columns", open_run(tmp_path, columns=True)), ("records", open_run(tmp_path))):
        assert not [a for a in log_view.actions if a.step > 20], name
        assert not [f for f in log_view.findings if f.reason.value == "nonfinite"], name
    result = analyze(open_run(tmp_path, columns=True))
    assert not result.actions and result.last_step == 30 and result.steps == 30
    assert not [f for f in result.findings if f.step > 20 and f.reason.value == "nonfinite"]
    live = read_run(tmp_path)
    assert not live.actions and not [f for f in live.findings if f.reason.value == "nonfinite"]
    assert live.last.step == 30


def test_save_total_limit_one_leaves_a_checkpoint_to_resume_from_after_the_rollback_save(tmp_path):
    """The rollback's checkpoint is pinned as a hard-linked copy: checkpoint-24 stays, so a kill
    right after it (rotation has deleted every other checkpoint) still resumes with
    resume_from_checkpoint=True, into the recovered state."""
    from transformers.trainer_utils import get_last_checkpoint

    guard = _guard()
    trainer = make_trainer(tiny_setup(n_train=128), str(tmp_path), callbacks=[guard, NanAt([24]), DieAt(24, "on_save")],
                           max_steps=30, learning_rate=1e-2, logging_steps=50, save_strategy="steps", save_steps=10,
                           save_total_limit=1)
    with pytest.raises(SystemExit):
        trainer.train()
    guard.report.writer.close()
    pinned = tmp_path / "lossguard-fallback-24"
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-24")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-24"]
    ckpt_files = {f.name for f in (tmp_path / "checkpoint-24").iterdir() if f.is_file()}
    assert {f.name for f in pinned.iterdir() if f.is_file()} == ckpt_files | {"lossguard_fallback.json"}
    for name in ckpt_files:
        assert (pinned / name).read_bytes() == (tmp_path / "checkpoint-24" / name).read_bytes()
    resumed = _guard()
    trainer = make_trainer(tiny_setup(n_train=128), str(tmp_path), callbacks=[resumed], max_steps=30,
                           learning_rate=1e-2, logging_steps=50, save_strategy="no")
    trainer.train(resume_from_checkpoint=True)
    (record,) = _records(tmp_path / "lossguard" / "events.jsonl", "resume")
    assert (record["step"], record["phase"], record["rollbacks"]) == (24, "low_lr", 1) and "abandoned" not in record

"""``lossguard inspect``: rich tables and JSON over real checkpoints; clear errors."""

from __future__ import annotations

import json
import shutil

import pytest

from lossguard.cli.inspect import command
from lossguard.inspection import CheckpointError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from lossguard.testing.tiny import make_trainer, tiny_setup

    out = tmp_path_factory.mktemp("inspect-run")
    setup = tiny_setup(pretrain_steps=20, n_train=64)
    make_trainer(setup, str(out), max_steps=4, save_strategy="steps", save_steps=2, logging_steps=2).train()
    return out


def test_run_dir_tables(run_dir, capsys):
    assert command(str(run_dir)) == 0
    out = capsys.readouterr().out
    assert "2 checkpoint(s)" in out
    assert "checkpoint-2" in out and "checkpoint-4" in out
    assert "newest checkpoint:" in out and f"{run_dir / 'checkpoint-4'}" in out.replace("\n", "")
    assert "resume only" in out and "pickle: not opened" in out
    assert "To swap this adapter you need only adapter_config.json + adapter weights" in out


def test_single_checkpoint_json(run_dir, capsys):
    assert command(str(run_dir / "checkpoint-4"), as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    ck = data["checkpoints"][0]
    assert data["kind"] == "checkpoint" and ck["step"] == 4
    assert ck["adapter_config"]["r"] == 8 and ck["adapter_weights"]["params"] == 16384
    assert ck["can_swap"] is True and ck["can_resume"] is True
    assert ck["trainer_state"]["global_step"] == 4


def test_broken_file_exits_1_and_names_it(run_dir, tmp_path, capsys):
    ck = tmp_path / "checkpoint-4"
    shutil.copytree(run_dir / "checkpoint-4", ck)
    (ck / "adapter_config.json").write_text("{oops")
    state = json.loads((ck / "trainer_state.json").read_text())
    state["log_history"].append({"step": 4, "loss": float("nan")})
    (ck / "trainer_state.json").write_text(json.dumps(state))
    assert command(str(ck)) == 1
    out = capsys.readouterr().out.replace("\n", "")
    assert "problem:" in out and "adapter_config.json: corrupt JSON" in out
    assert command(str(ck), as_json=True) == 1
    data = json.loads(capsys.readouterr().out)  # strict JSON: the NaN loss is spelled "nan"
    assert data["checkpoints"][0]["trainer_state"]["last_loss"] == "nan"
    assert data["problems"]


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint or run directory"):
        command(str(tmp_path / "missing"))


def test_through_the_app_exit_codes_and_one_line_error(run_dir, tmp_path, capsys):
    from lossguard.cli import main

    with pytest.raises(SystemExit) as ok:
        main(["inspect", str(run_dir), "--json"])
    assert ok.value.code == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "run"
    with pytest.raises(SystemExit) as bad:
        main(["inspect", str(tmp_path / "missing")])
    assert bad.value.code == 2
    err = capsys.readouterr().err
    assert err == f"lossguard: error: {tmp_path / 'missing'}: no such checkpoint or run directory\n"


def test_run_dir_lists_the_fallbacks_lossguard_kept(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    fallback = run / "lossguard-fallback-4"  # as recovery pins one: a checkpoint moved out of rotation
    (run / "checkpoint-4").rename(fallback)
    message = "kept the checkpoint of step 4 as lossguard-fallback-4: the first save after the rollback to step 2"
    (fallback / "lossguard_fallback.json").write_text(json.dumps({"step": 4, "restored_from_step": 2,
                                                                   "message": message}))
    assert command(str(run)) == 0
    out = capsys.readouterr().out
    assert "1 checkpoint(s) and 1 fallback(s) lossguard kept" in out
    assert f"lossguard-fallback-4: {message}" in out.replace("\n", "")
    assert command(str(run), as_json=True) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in doc["checkpoints"]] == [2]
    assert [(c["step"], c["fallback_note"]) for c in doc["fallbacks"]] == [(4, message)]

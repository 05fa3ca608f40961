"""Foreign readers on files shaped like real output of the Trainer, LLaMA-Factory and Lightning."""

import json
import math

import pytest

from lossguard.errors import LogReadError
from lossguard.telemetry import find_source, open_run
from lossguard.telemetry.foreign import read_lightning_csv, read_llamafactory, read_trainer_state

# transformers >= 4.38: grad_norm present; NaN/Infinity literals as json.dump writes them
STATE_NEW = """{
  "best_metric": null, "best_model_checkpoint": null, "epoch": 0.64, "eval_steps": 20,
  "global_step": 60, "is_hyper_param_search": false, "is_local_process_zero": true,
  "is_world_process_zero": true,
  "log_history": [
    {"epoch": 0.21, "grad_norm": 1.25, "learning_rate": 0.00019, "loss": 2.3061, "step": 20},
    {"epoch": 0.21, "eval_loss": 2.2, "eval_runtime": 1.5, "eval_samples_per_second": 40.1, "step": 20},
    {"epoch": 0.43, "grad_norm": NaN, "learning_rate": 0.00017, "loss": NaN, "step": 40},
    {"epoch": 0.64, "grad_norm": Infinity, "learning_rate": 0.00015, "loss": 1.9, "step": 60},
    {"epoch": 0.64, "step": 60, "total_flos": 1234.0, "train_loss": 2.1, "train_runtime": 10.2}
  ],
  "logging_steps": 20, "max_steps": 282, "num_input_tokens_seen": 0, "num_train_epochs": 3,
  "save_steps": 200, "total_flos": 1234.0, "train_batch_size": 2, "trial_name": null, "trial_params": null
}"""

# transformers 4.2x-4.3x: no grad_norm
STATE_OLD = {
    "epoch": 1.0, "global_step": 30, "max_steps": 30, "num_train_epochs": 1,
    "log_history": [
        {"epoch": 0.33, "learning_rate": 4e-05, "loss": 3.1, "step": 10},
        {"epoch": 0.67, "learning_rate": 2e-05, "loss": 2.8, "step": 20},
        {"epoch": 1.0, "learning_rate": 0.0, "loss": 2.7, "step": 30},
    ],
}


def _write_state(path, text):
    path.mkdir(parents=True, exist_ok=True)
    (path / "trainer_state.json").write_text(text)
    return path / "trainer_state.json"


def test_trainer_state_new_format_with_literals_and_eval_entries(tmp_path):
    log = read_trainer_state(_write_state(tmp_path / "checkpoint-60", STATE_NEW))
    assert [s.step for s in log.samples] == [20, 40, 60]  # eval and final summary are not samples
    assert log.samples[0].loss == pytest.approx(2.3061) and log.samples[0].grad_norm == 1.25
    assert math.isnan(log.samples[1].loss) and math.isnan(log.samples[1].grad_norm)
    assert log.samples[2].grad_norm == math.inf and log.samples[2].lr == pytest.approx(1.5e-4)
    assert log.max_steps == 282 and log.num_train_epochs == 3
    assert log.evals[0]["eval_loss"] == 2.2


def test_trainer_state_old_format_without_grad_norm(tmp_path):
    log = read_trainer_state(_write_state(tmp_path, json.dumps(STATE_OLD)))
    assert [(s.step, s.loss, s.grad_norm) for s in log.samples] == [(10, 3.1, None), (20, 2.8, None), (30, 2.7, None)]


def test_trainer_state_truncated_or_corrupt_names_the_file(tmp_path):
    p = _write_state(tmp_path / "checkpoint-40", STATE_NEW[:300])
    with pytest.raises(LogReadError, match=r"checkpoint-40/trainer_state.json: truncated JSON"):
        read_trainer_state(p)
    p.write_text('{"log_history": [}')
    with pytest.raises(LogReadError, match="corrupt JSON"):
        read_trainer_state(p)
    p.write_text("[1, 2]")
    with pytest.raises(LogReadError, match="not a trainer_state.json"):
        read_trainer_state(p)


def test_open_run_picks_newest_checkpoint_and_falls_back_when_it_is_corrupt(tmp_path):
    _write_state(tmp_path / "checkpoint-30", json.dumps(STATE_OLD))
    _write_state(tmp_path / "checkpoint-100", STATE_NEW)
    _write_state(tmp_path / "checkpoint-200", STATE_NEW[:50])  # caught mid-write
    (tmp_path / "checkpoint-9").mkdir()  # no state file
    src = find_source(tmp_path)
    assert src.kind == "trainer_state" and src.path.parent.name == "checkpoint-200"
    log = open_run(tmp_path)
    assert log.path.parent.name == "checkpoint-100" and log.last_step == 60


def test_lossguard_telemetry_is_preferred(tmp_path):
    _write_state(tmp_path / "checkpoint-100", STATE_NEW)
    (tmp_path / "lossguard").mkdir()
    (tmp_path / "lossguard" / "events.jsonl").write_text('{"v":1,"kind":"sample","step":1,"loss":1.0}\n')
    log = open_run(tmp_path)
    assert log.source == "lossguard" and log.samples[0].loss == 1.0


LLAMAFACTORY = "\n".join([
    '{"current_steps": 5, "total_steps": 120, "loss": 2.41, "lr": 4.9e-05, "epoch": 0.12, "percentage": 4.17, "elapsed_time": "0:00:31", "remaining_time": "0:12:03"}',
    '{"current_steps": 10, "total_steps": 120, "loss": 2.2, "lr": 4.8e-05, "epoch": 0.25, "percentage": 8.33, "elapsed_time": "0:01:02", "remaining_time": "0:11:20"}',
    '{"current_steps": 10, "total_steps": 120, "loss": 2.19, "lr": 4.8e-05, "epoch": 0.25, "percentage": 8.33, "elapsed_time": "0:01:02", "remaining_time": "0:11:20"}',
    '{"current_steps": 15, "total_steps": 120, "loss": null, "lr": null, "epoch": 0.38}',
    '{"current_steps": 15, "total_steps": 120, "eval_loss": 2.0, "epoch": 0.38}',
    '{"current_steps": 20, "total_steps": 120, "loss": NaN, "lr": 4.6e-05, "epoch": 0.5}',
    '{"current_steps": 25, "total_steps": 120, "lo',
])


def test_llamafactory_log_with_duplicates_nulls_and_a_truncated_run(tmp_path):
    (tmp_path / "trainer_log.jsonl").write_text(LLAMAFACTORY)
    log = open_run(tmp_path)
    assert log.source == "llamafactory" and log.max_steps == 120
    assert [s.step for s in log.samples] == [5, 10, 20]
    assert log.samples[1].loss == 2.19  # duplicated step: the last wins
    assert math.isnan(log.samples[2].loss)
    assert log.evals == [{"kind": "eval", "step": 15, "eval_loss": 2.0}]


LIGHTNING = """epoch,lr-AdamW,step,train_loss_epoch,train_loss_step,val_loss
0,0.001,0,,3.2,
0,0.001,49,,2.9,
0,,49,,,2.95
0,,49,2.97,,
1,0.0009,99,,inf,
"""


def test_lightning_csv_found_three_levels_down(tmp_path):
    d = tmp_path / "lightning_logs" / "version_3"
    d.mkdir(parents=True)
    (d / "metrics.csv").write_text(LIGHTNING)
    log = open_run(tmp_path)
    assert log.source == "lightning"
    assert [(s.step, s.loss, s.lr) for s in log.samples][:2] == [(0, 3.2, 0.001), (49, 2.9, 0.001)]
    assert log.samples[2].loss == math.inf and log.samples[2].epoch == 1
    assert log.evals[0]["eval_loss"] == 2.95


def test_lightning_csv_with_plain_loss_column_and_bad_header(tmp_path):
    p = tmp_path / "metrics.csv"
    p.write_text("step,loss\n1,2.0\n2,1.5\n")
    assert [s.loss for s in read_lightning_csv(p).samples] == [2.0, 1.5]
    p.write_text("a,b\n1,2\n")
    with pytest.raises(LogReadError, match="not a Lightning metrics.csv"):
        read_lightning_csv(p)


def test_run_dir_errors_are_one_clear_line(tmp_path):
    with pytest.raises(LogReadError, match="no such directory"):
        open_run(tmp_path / "nope")
    with pytest.raises(LogReadError, match="no training log found"):
        open_run(tmp_path)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(LogReadError, match="not a directory"):
        open_run(f)


def test_llamafactory_reader_rejects_garbage(tmp_path):
    p = tmp_path / "trainer_log.jsonl"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(LogReadError, match="trainer_log.jsonl"):
        read_llamafactory(p)


def test_lightning_csv_with_slash_metric_names_as_rl4co_writes_them(tmp_path):
    # First rows of a real RL4CO (PPO) metrics.csv: `self.log("train/loss")`, "val/reward" rows
    # without a loss. Found by the real-log corpus (HySonLab/ArcRoute); the reader missed it.
    p = tmp_path / "metrics.csv"
    p.write_text(
        "epoch,step,train/entropy,train/loss,train/reward,val/reward\n"
        "0,49,25.98388671875,-0.02284548431634903,-5.757747173309326,\n"
        "0,99,25.42140007019043,0.48641592264175415,-6.055891036987305,\n"
        "0,488,,,,-56.78908920288086\n"
        "1,499,28.206554412841797,5.126415729522705,-9.734471321105957,\n"
    )
    log = read_lightning_csv(p)
    assert [(s.step, s.loss, s.epoch) for s in log.samples] == [
        (49, -0.02284548431634903, 0), (99, 0.48641592264175415, 0), (499, 5.126415729522705, 1)
    ]


def test_lightning_csv_with_only_an_epoch_level_train_loss(tmp_path):
    # The first rows are a real metrics.csv that logs the training loss once per epoch
    # (Awritrojit/AIOPS_learning_mnist, found by the real-log corpus); the "val/loss" column is
    # added here to cover the slash-named validation loss. Not "not a Lightning metrics.csv".
    p = tmp_path / "metrics.csv"
    p.write_text(
        "acc_epoch,epoch,step,train_loss_epoch,val/loss\n"
        "0.15625,0,3,2.282355308532715,\n"
        "0.40625,1,7,1.6110919713974,\n"
        ",1,7,,1.5\n"
    )
    log = read_lightning_csv(p)
    assert [(s.step, s.loss) for s in log.samples] == [(3, 2.282355308532715), (7, 1.6110919713974)]
    assert log.evals == [{"kind": "eval", "step": 7, "eval_loss": 1.5}]


def test_trainer_state_with_a_custom_trainer_logging_lr_instead_of_learning_rate(tmp_path):
    # The first entry of a real trainer_state.json (HangerYang/Star, found by the real-log
    # corpus): a custom Trainer logs "lr" (and a "remaining_time" string), not "learning_rate";
    # the reader dropped the learning rate.
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({"global_step": 40000, "log_history": [
        {"epoch": 0.0015824036711765172, "grad_norm": 4.8393846636618925,
         "loss": 24.79317626953125, "lr": 0.0001, "remaining_time": "59h:30m:19s", "step": 20},
    ]}))
    (s,) = read_trainer_state(p).samples
    assert (s.step, s.loss, s.lr, s.grad_norm) == (20, 24.79317626953125, 0.0001, 4.8393846636618925)

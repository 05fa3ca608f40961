"""``lossguard.load_run``: DataFrames from every supported log."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import lossguard
from lossguard.errors import LogReadError
from lossguard.telemetry import EventWriter


def test_load_run_from_lossguard_telemetry(tmp_path: Path) -> None:
    with EventWriter(tmp_path / "lossguard" / "events.jsonl", clock=lambda: 5.0) as w:
        w.write("run", max_steps=40, learning_rate=1e-3)
        for i in range(1, 31):
            w.write("sample", step=i, loss=math.nan if i == 20 else 2.0, grad_norm=0.5, lr=1e-3, tokens=128)
        w.write("sample", step=30, loss=1.5, grad_norm=0.5, lr=1e-3)  # duplicated step: last wins
        w.write_record({"kind": "action", "action": "rollback", "step": 21, "from_step": 21, "to_step": 10,
                        "message": "rolled back"})
        w.write_record({"kind": "probe", "step": 25, "lambda_max": 2.0, "lambda_min": -0.1, "ratio": -0.05,
                        "verdict": "inconclusive"})
        w.write_record({"kind": "gpu", "step": 25, "gpus": [{"index": 0, "util_mean": 91.0},
                                                            {"index": 1, "util_mean": 12.0, "power_w": 80}]})
    rf = lossguard.load_run(tmp_path)
    assert rf.source == "lossguard" and rf.source_path == tmp_path / "lossguard" / "events.jsonl"
    s = rf.samples
    assert list(s.columns) == ["step", "loss", "grad_norm", "lr", "epoch", "step_time_s", "tokens", "t"]
    assert s["step"].tolist() == list(range(1, 31))
    assert math.isnan(s.loc[s.step == 20, "loss"].item()) and s.loc[s.step == 30, "loss"].item() == 1.5
    assert str(s["tokens"].dtype) == "Int64" and s["tokens"].iloc[0] == 128
    assert rf.findings[["step", "reason", "severity"]].values.tolist() == [[20, "nonfinite", "critical"]]
    assert rf.actions[["step", "action", "to_step"]].values.tolist() == [[21, "rollback", 10]]
    assert rf.probes[["step", "verdict"]].values.tolist() == [[25, "inconclusive"]]
    assert rf.gpu[["index", "util_mean"]].values.tolist() == [[0, 91.0], [1, 12.0]]
    # the NaN at 20 was rolled back to step 10: handled
    assert rf.run is not None and rf.run["max_steps"] == 40 and rf.status == "recovered"


def test_load_run_from_trainer_state(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoint-3"
    ck.mkdir()
    (ck / "trainer_state.json").write_text(json.dumps({"max_steps": 9, "log_history": [
        {"step": 1, "loss": 2.0, "learning_rate": 1e-4}, {"step": 2, "loss": 1.9, "grad_norm": 3.0},
        {"step": 2, "eval_loss": 1.8}, {"step": 3, "loss": 1.8}]}))
    rf = lossguard.load_run(tmp_path)
    assert rf.source == "trainer_state"
    assert rf.samples[["step", "loss"]].values.tolist() == [[1, 2.0], [2, 1.9], [3, 1.8]]
    assert rf.evals["eval_loss"].tolist() == [1.8]
    assert rf.findings.empty and list(rf.findings.columns)[:4] == ["step", "onset_step", "reason", "severity"]
    assert rf.gpu.empty and rf.probes.empty


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(LogReadError, match="no such directory"):
        lossguard.load_run(tmp_path / "missing")
    with pytest.raises(LogReadError, match=r"no training log found \(looked for lossguard/events.jsonl, checkpoint-\*/trainer_state.json"):
        lossguard.load_run(tmp_path)

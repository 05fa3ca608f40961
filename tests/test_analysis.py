import io
import json
import math
from contextlib import redirect_stdout

import numpy as np
import pytest

from lossguard.analysis import analyze
from lossguard.cli.watch_once import once
from lossguard.errors import LossguardError
from lossguard.records import Finding, Reason, Severity
from lossguard.telemetry import EventWriter, open_run


def _trainer_state(path, n, *, grad_norm=True, every=10, nan_at=None, epochs=3.0, seed=0):
    rng = np.random.default_rng(seed)
    hist = []
    for i in range(1, n + 1):
        step = i * every
        e = {"epoch": round(epochs * i / n, 4), "learning_rate": 2e-4 * (1 - i / n), "step": step,
             "loss": round(float((0.8 + 2 * (1 + step / 200) ** -0.5) * (1 + 0.03 * rng.standard_normal())), 4)}
        if grad_norm:
            e["grad_norm"] = float(np.exp(0.2 * rng.standard_normal()))
        if nan_at is not None and i >= nan_at:
            e["loss"] = math.nan
            e["grad_norm"] = math.inf
        hist.append(e)
        if i % 50 == 0:
            hist.append({"epoch": e["epoch"], "eval_loss": 1.2, "eval_runtime": 0.5, "step": step})
    hist.append({"epoch": epochs, "step": n * every, "total_flos": 1.0, "train_loss": 1.1, "train_runtime": 9.0})
    state = {"global_step": n * every, "max_steps": n * every, "num_train_epochs": epochs,
             "logging_steps": every, "log_history": hist}
    path.mkdir(parents=True, exist_ok=True)
    (path / "trainer_state.json").write_text(json.dumps(state))  # NaN / Infinity literals, as the Trainer writes


def _once(run, *args):
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = once(str(run), *args)
    return code, buf.getvalue()


@pytest.mark.parametrize("n,grad_norm", [(3, True), (8, False), (20_000, True), (20_000, False)])
def test_foreign_trainer_state_never_raises(tmp_path, n, grad_norm):
    _trainer_state(tmp_path / "checkpoint-10", n, grad_norm=grad_norm)
    code, out = _once(tmp_path, True, "warning")
    doc = json.loads(out)
    assert set(doc) == {"run_dir", "source", "steps", "last_step", "findings", "actions", "verdicts", "status",
                        "handled", "open", "checks_off", "unfinished"}
    assert doc["source"] == "trainer_state" and doc["steps"] == n and doc["last_step"] == n * 10
    assert doc["status"] in ("healthy", "warning", "critical")
    assert code == (0 if doc["status"] == "healthy" else 1)


def test_nan_and_infinity_literals_give_a_critical_nonfinite_finding(tmp_path):
    _trainer_state(tmp_path / "checkpoint-500", 60, nan_at=40)
    code, out = _once(tmp_path, True, "critical")
    doc = json.loads(out)
    nf = [f for f in doc["findings"] if f["reason"] == "nonfinite"]
    assert code == 1 and doc["status"] == "critical"
    assert len(nf) == 1 and nf[0]["step"] == 400 and nf[0]["severity"] == "critical"
    assert set(nf[0]) == {"reason", "severity", "step", "onset_step", "message"}


def test_text_output_and_bad_fail_on(tmp_path):
    _trainer_state(tmp_path / "checkpoint-10", 30)
    code, out = _once(tmp_path, False, None)
    assert code == 0 and "trainer_state" in out and "30 samples" in out
    with pytest.raises(LossguardError):
        once(str(tmp_path), True, "sometimes")


def test_text_output_is_one_line_per_item_when_piped(tmp_path):
    run = tmp_path / ("a-run-directory-with-a-long-name-" * 3)  # the header alone is past 80 columns
    _trainer_state(run / "checkpoint-10", 30)
    code, out = _once(run, False, None)
    assert out.splitlines()[0] == f"{run} (trainer_state): 30 samples, last step 300, status healthy"


def test_telemetry_log_merges_recorded_and_replayed_findings(tmp_path):
    path = tmp_path / "lossguard" / "events.jsonl"
    with EventWriter(path, clock=lambda: 1.0) as w:
        w.write("run", max_steps=400)
        for i in range(1, 201):
            loss = math.nan if i == 150 else 2.0 + 0.01 * math.sin(i)
            w.write("sample", step=i, loss=loss, grad_norm=1.0)
        recorded = Finding(Reason.NONFINITE, Severity.CRITICAL, 150, 150, "recorded online", detector="nonfinite")
        w.write_record(recorded.to_record())
        w.write_record({"kind": "finding", "reason": "relapse", "severity": "warning", "step": 180,
                        "onset_step": 170, "message": "relapse after restore"})
        w.write("action", action="rollback", step=151, from_step=151, to_step=25, message="rolled back")
    result = analyze(open_run(tmp_path))
    reasons = [(f.reason, f.step, f.message) for f in result.findings]
    assert (Reason.NONFINITE, 150, "recorded online") in reasons
    assert sum(r == Reason.NONFINITE for r, _, _ in reasons) == 1
    assert (Reason.RELAPSE, 180, "relapse after restore") in reasons
    doc = result.to_json(str(tmp_path))
    assert doc["actions"][0]["action"] == "rollback" and "kind" not in doc["actions"][0]
    # the NaN was rolled back (handled); the relapse after it was not: open, a warning
    assert doc["status"] == "warning" and doc["steps"] == 200
    assert doc["handled"] == ["nonfinite@150"] and "relapse@180" in doc["open"]


@pytest.mark.parametrize("source", ["lossguard", "trainer_state", "llamafactory"])
def test_damaged_steps_and_huge_numbers_are_skipped_not_raised(tmp_path, source):
    # step numbers no training has (1e30, 1e308, inf, negative, text) used to overflow the int64
    # step column (OverflowError); a loss past 1e308 was an overflow in float()
    bad_steps = [10**30, 1e308, "inf", -5, "x", True, None]
    good = [{"step": i, "loss": 2.0 - i / 100} for i in range(1, 61)]
    good[30]["loss"] = 10**400
    rows = good[:20] + [{"step": s, "loss": 1.0} for s in bad_steps] + good[20:]
    if source == "lossguard":
        path = tmp_path / "lossguard" / "events.jsonl"
        path.parent.mkdir()
        lines = [json.dumps({"v": 1, "t": 1.0, "kind": "run", "max_steps": math.inf}, allow_nan=True)]
        lines += [json.dumps({"v": 1, "t": 1.0, "kind": "sample", **r}) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif source == "trainer_state":
        path = tmp_path / "checkpoint-60" / "trainer_state.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"max_steps": 10**30, "log_history": rows}))
    else:
        path = tmp_path / "trainer_log.jsonl"
        path.write_text("\n".join(json.dumps({"current_steps": r["step"], "loss": r["loss"], "total_steps": 1e308})
                                  for r in rows) + "\n")
    code, out = _once(tmp_path, True, None)
    doc = json.loads(out)
    assert code == 0 and doc["steps"] == 60 and doc["last_step"] == 60
    assert any(f["reason"] == "nonfinite" and f["step"] == 31 for f in doc["findings"])  # 10**400 is inf


def test_json_lists_the_safety_nets_verdicts(tmp_path):
    with EventWriter(tmp_path / "lossguard" / "events.jsonl", clock=lambda: 1.0) as w:
        w.write("run", max_steps=400)
        for i in range(1, 201):
            w.write("sample", step=i, loss=2.0, grad_norm=1.0)
        w.write("action", action="rollback", step=100, from_step=100, to_step=50, reason="spike", message="rb",
                details={"verdict_step": 150})
        w.write("action", action="revert", step=150, from_step=150, to_step=100, reason="spike", message="rv",
                details={"head_score": 1.0, "branch_score": float("nan"), "gain": float("nan"), "stderr": 0.01,
                         "head_step": 100, "false_alarm": "spike"})
    doc = analyze(open_run(tmp_path)).to_json(str(tmp_path))
    assert doc["verdicts"] == [{"step": 150, "verdict": "revert", "reason": "spike", "head_step": 100,
                                "head_score": 1.0, "branch_score": "nan", "gain": "nan", "stderr": 0.01,
                                "false_alarm": "spike"}]
    json.dumps(doc, allow_nan=False)  # strict JSON, as watch --once --json prints it

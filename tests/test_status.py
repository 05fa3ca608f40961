"""A run's status: handled trouble (``recovered``) apart from open trouble, and no verdict without data."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from lossguard.cli import _register, app
from lossguard.cli.watch_once import once
from lossguard.presentation.dashboard import render
from lossguard.records import Action, ActionKind, Finding, Reason, Severity
from lossguard.status import RunStatus, run_status
from lossguard.telemetry import EventWriter
from lossguard.watch.follow import RunFollower
from lossguard.watch.live import LiveRun, read_run

_register()


def _loss(i: int) -> float:
    return 1.0 + 2.0 * math.exp(-i / 80) + 0.02 * math.sin(1.7 * i)


def _plateau() -> Finding:
    return Finding(Reason.EARLY_CONVERGENCE, Severity.WARNING, 101, 11, "premature plateau", detector="plateau")


def _rollback(step: int, to: int, reason: Reason) -> Action:
    return Action(ActionKind.ROLLBACK, step, f"rolled back to step {to}", from_step=step, to_step=to, reason=reason)


def _write(run: Path, *, steps: int = 300, max_steps: int | None = 300, records=(), end: bool = True) -> None:
    with EventWriter(run / "lossguard" / "events.jsonl", clock=lambda: 1.0) as w:
        w.write("run", max_steps=max_steps)
        for i in range(1, steps + 1):
            w.write("sample", step=i, loss=_loss(i), grad_norm=1.0, lr=1e-3)
        for rec in records:
            w.write_record(rec.to_record())
        if end:
            w.write("end", step=steps)


def _recovered_records():
    """What the demo recorded: a plateau rolled back, a relapse after the LR came back, rolled back too."""
    relapse = Finding(Reason.RELAPSE, Severity.WARNING, 240, 225, "relapse: loss rose", detector="recovery")
    return [_plateau(), _rollback(110, 0, Reason.EARLY_CONVERGENCE),
            Action(ActionKind.LR_OVERRIDE, 110, "lr x0.1", lr_factor=0.1),
            Action(ActionKind.LR_RESTORE, 220, "scheduled lr again"),
            relapse, _rollback(240, 220, Reason.RELAPSE),
            Action(ActionKind.KEEP, 290, "recovered branch kept", reason=Reason.EARLY_CONVERGENCE)]


def _once(run: Path, *args) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = once(str(run), *args)
    return code, buf.getvalue()


def test_a_run_whose_trouble_was_rolled_back_is_recovered_not_critical(tmp_path):
    _write(tmp_path, records=_recovered_records())
    code, out = _once(tmp_path, True, "critical")
    doc = json.loads(out)
    assert (code, doc["status"]) == (0, "recovered")
    assert doc["handled"] == ["early_convergence@101", "relapse@240"] and doc["open"] == []
    codes = {level: _once(tmp_path, True, level)[0] for level in ("info", "recovered", "warning", "critical")}
    assert codes == {"info": 1, "recovered": 1, "warning": 0, "critical": 0}
    code, text = _once(tmp_path, False, None)
    assert "status recovered" in text.splitlines()[0]
    assert "  handled: early_convergence at step 101, relapse at step 240" in text


def test_trouble_left_after_the_recovery_is_open(tmp_path):
    nan = Finding(Reason.NONFINITE, Severity.CRITICAL, 280, 280, "loss is nan", detector="nonfinite")
    _write(tmp_path, records=[*_recovered_records(), nan])
    code, out = _once(tmp_path, True, "critical")
    doc = json.loads(out)
    assert (code, doc["status"], doc["open"]) == (1, "critical", ["nonfinite@280"])
    assert doc["handled"] == ["early_convergence@101", "relapse@240"]


def test_a_rollback_the_safety_net_reverted_as_a_false_alarm_is_handled():
    revert = Action(ActionKind.REVERT, 230, "false alarm: back to the head", reason=Reason.EARLY_CONVERGENCE,
                    details={"false_alarm": True})
    verdict = run_status([_plateau()], [_rollback(110, 0, Reason.EARLY_CONVERGENCE), revert], 300,
                         last_step=300, max_steps=300)
    assert verdict.status is RunStatus.RECOVERED and [f.step for f in verdict.handled] == [101]
    # a rollback that did not reach back to the onset did not undo it
    verdict = run_status([_plateau()], [_rollback(110, 50, Reason.EARLY_CONVERGENCE)], 300, max_steps=300)
    assert verdict.status is RunStatus.WARNING and [f.step for f in verdict.open] == [101]
    gave_up = Action(ActionKind.GIVE_UP, 250, "gave up")
    verdict = run_status([_plateau()], [_rollback(110, 0, Reason.EARLY_CONVERGENCE), gave_up], 300, max_steps=300)
    assert verdict.status is RunStatus.CRITICAL


def test_the_report_and_the_dashboard_show_the_same_status(tmp_path):
    _write(tmp_path, records=_recovered_records())
    live = read_run(tmp_path)
    assert live.status is RunStatus.RECOVERED
    buf = io.StringIO()
    Console(file=buf, width=140, color_system=None).print(render(live, width=140, now=2.0))
    assert "status RECOVERED" in buf.getvalue() and "handled: early_convergence at 101, relapse at 240" in buf.getvalue()
    r = CliRunner().invoke(app, ["report", str(tmp_path), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    assert '<span class="status recovered">RECOVERED</span> handled: early_convergence at step 101' in page


def test_an_empty_log_is_no_data_and_fails_every_fail_on(tmp_path):
    (tmp_path / "lossguard").mkdir()
    (tmp_path / "lossguard" / "events.jsonl").write_text("")
    code, out = _once(tmp_path, True, "critical")
    doc = json.loads(out)
    assert (code, doc["status"], doc["steps"]) == (1, "no_data", 0)
    code, text = _once(tmp_path, False, None)
    assert code == 0 and "0 samples, last step None, status no_data" in text


def test_the_dashboard_waiting_for_a_run_is_not_healthy(tmp_path):
    follower = RunFollower(tmp_path)
    live = LiveRun(tmp_path)
    live.fold(follower.poll())
    assert live.waiting and live.status is RunStatus.NO_DATA
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None).print(render(live, width=120, now=2.0))
    assert "status WAITING" in buf.getvalue() and "HEALTHY" not in buf.getvalue()


def test_a_run_of_unknown_length_says_the_plateau_check_was_off(tmp_path):
    with open(tmp_path / "metrics.csv", "w") as fh:  # a Lightning CSV flat at 2.5
        fh.write("epoch,step,train_loss\n")
        for i in range(470):
            fh.write(f"0,{i},2.5\n")
    code, out = _once(tmp_path, True, None)
    doc = json.loads(out)
    assert doc["status"] == "healthy"
    assert doc["checks_off"] == ["early convergence (run length unknown: the log gives no max_steps or epochs)"]
    assert "  check off: early convergence (run length unknown" in _once(tmp_path, False, None)[1]


def test_a_log_cut_off_before_its_planned_end_is_called_unfinished(tmp_path):
    _write(tmp_path, steps=276, max_steps=600, end=False)
    doc = json.loads(_once(tmp_path, True, None)[1])
    assert doc["unfinished"].startswith("unfinished: last step 276 of 600")
    _write(tmp_path / "done", steps=300, max_steps=300, end=True)
    assert json.loads(_once(tmp_path / "done", True, None)[1])["unfinished"] is None


def test_report_refuses_a_log_whose_only_line_is_broken_as_watch_once_does(tmp_path):
    (tmp_path / "lossguard").mkdir()
    (tmp_path / "lossguard" / "events.jsonl").write_text('{"kind": "sample", "st')
    runner = CliRunner()
    once_ = runner.invoke(app, ["watch", str(tmp_path), "--once"])
    report = runner.invoke(app, ["report", str(tmp_path)])
    assert "unreadable line" in str(once_.exception) and "unreadable line" in str(report.exception)
    assert not (tmp_path / "lossguard" / "report.html").exists()


@pytest.mark.parametrize("level", ["info", "recovered", "warning", "critical"])
def test_fail_on_takes_every_level(tmp_path, level):
    _write(tmp_path, records=_recovered_records())
    r = CliRunner().invoke(app, ["watch", str(tmp_path), "--once", "--fail-on", level])
    assert r.exit_code == (1 if level in ("info", "recovered") else 0), r.output

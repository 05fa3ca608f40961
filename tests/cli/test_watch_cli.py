"""``lossguard watch`` / ``report`` / ``export`` through typer's CliRunner and a real subprocess."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from lossguard.cli import _register, app, main
from lossguard.cli.watch import live
from lossguard.errors import LossguardError
from lossguard.telemetry import EventWriter

ROOT = Path(__file__).resolve().parents[2]
_register()


def _run(run_dir: Path, steps: int = 60, nan_at: int | None = 40) -> None:
    with EventWriter(run_dir / "lossguard" / "events.jsonl", clock=lambda: 1.0) as w:
        w.write("run", max_steps=100)
        for i in range(1, steps + 1):
            w.write("sample", step=i, loss=math.nan if i == nan_at else 2.0, grad_norm=1.0, lr=1e-3)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lossguard", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)


def test_report_and_export_with_clirunner(tmp_path: Path) -> None:
    _run(tmp_path / "run")
    runner = CliRunner()
    r = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    default = tmp_path / "run" / "lossguard" / "report.html"
    assert f"wrote {default} (" in r.output and "60 steps, 1 finding(s), status critical" in r.output
    assert default.read_text().startswith("<!DOCTYPE html>")
    out = tmp_path / "s.csv"
    r = runner.invoke(app, ["export", str(tmp_path / "run"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 60 and rows[39]["findings"] == "nonfinite" and rows[38]["findings"] == ""
    assert rows[0]["loss"] == "2.0" and rows[39]["loss"] == ""


def test_watch_once_delegates(tmp_path: Path) -> None:
    _run(tmp_path)
    r = CliRunner().invoke(app, ["watch", str(tmp_path), "--once", "--json", "--fail-on", "critical"])
    assert r.exit_code == 1
    got = json.loads(r.output)
    assert got["status"] == "critical" and [f["step"] for f in got["findings"]] == [40]


def test_fail_on_without_once_implies_once_instead_of_watching_forever(tmp_path: Path) -> None:
    _run(tmp_path)
    r = _cli("watch", str(tmp_path), "--fail-on", "warning", timeout=60)
    assert r.returncode == 1 and r.stderr == "lossguard: --fail-on implies --once (one analysis, then exit)\n"
    assert r.stdout.splitlines()[0].endswith("60 samples, last step 60, status critical")
    r = _cli("watch", str(tmp_path), "--json", timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "critical"


@pytest.mark.parametrize(("args", "message"), [
    (["watch", "RUN", "--daemon", "--json"], "--json needs --once (the daemon does not print JSON)"),
    (["watch", "RUN", "--once", "--daemon"], "--once and --daemon cannot be combined; pick one"),
    (["watch", "RUN", "--on-alert", "true"], "--on-alert needs --daemon"),
    (["watch", "RUN", "--refresh", "0"], "--refresh 0: expected 0.05 to 3600 seconds"),
    (["watch", "RUN", "--daemon", "--fail-on", "recovered"],
     "--fail-on 'recovered': with --daemon, the alert level; expected one of info, warning, critical"),
    (["watch", "RUN", "--once", "--fail-on", "sometimes"],
     "--fail-on 'sometimes': expected one of info, recovered, warning, critical"),
])
def test_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    r = CliRunner().invoke(app, [str(tmp_path) if a == "RUN" else a for a in args])
    assert isinstance(r.exception, LossguardError) and str(r.exception) == message


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    garbage = tmp_path / "garbage" / "lossguard"
    garbage.mkdir(parents=True)
    (garbage / "events.jsonl").write_bytes(bytes(range(256)) * 50)
    _run(tmp_path / "multi" / "a")
    _run(tmp_path / "multi" / "b")
    cases = {
        ("report", str(tmp_path / "missing")): f"{tmp_path / 'missing'}: no such directory",
        ("export", str(tmp_path / "afile")): f"{tmp_path / 'afile'}: not a directory (expected a Trainer output_dir)",
        ("report", str(tmp_path / "empty")): f"{tmp_path / 'empty'}: no training log found (looked for "
                                              "lossguard/events.jsonl, checkpoint-*/trainer_state.json, "
                                              "trainer_log.jsonl, metrics.csv)",
        ("report", str(tmp_path / "garbage")): f"{garbage / 'events.jsonl'}: not a readable log (50 unreadable line(s), no sample)",
        ("watch", str(tmp_path / "multi")): f"{tmp_path / 'multi'}: holds 2 runs (a, b); watch one of them, e.g. "
                                            f"{tmp_path / 'multi' / 'a'}",
        ("report", str(tmp_path / "multi" / "a"), "-o", str(tmp_path)):
            f"{tmp_path}: is a directory; give a file name, e.g. -o {tmp_path / 'report.html'}",
    }
    for args, message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        out, err = capsys.readouterr()
        assert (exit_.value.code, out, err) == (2, "", f"lossguard: error: {message}\n"), args
    # and once for real, as a separate process
    r = _cli("watch", str(tmp_path / "multi"))
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"lossguard: error: {cases[('watch', str(tmp_path / 'multi'))]}\n")


def test_live_dashboard_draws_and_follows(tmp_path: Path) -> None:
    _run(tmp_path, steps=30, nan_at=None)
    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=True, color_system=None)
    assert live(str(tmp_path), 0.05, max_polls=2, console=console) == 0
    out = buf.getvalue()
    assert "step 30/100" in out and "status HEALTHY" in out and "no findings" in out


def test_live_watch_in_a_subprocess_waits_then_follows(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Ctrl-C must reach the child even when this test runs under a shell that ignores SIGINT
    # (a background job inherits SIG_IGN, and Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen([sys.executable, "-m", "lossguard", "watch", str(tmp_path), "--refresh", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(f"waiting for training to start: no log in {tmp_path} yet")
        _run(tmp_path, steps=10, nan_at=None)
        seen = [proc.stdout.readline() for _ in range(2)]
        assert seen[0] == f"lossguard: reading {tmp_path}/lossguard/events.jsonl (lossguard)\n"
        assert seen[1] == "step 10/100 loss 2 status healthy findings 0\n"
        with open(tmp_path / "lossguard" / "events.jsonl", "a") as fh:
            fh.write('{"kind":"sample","step":11,"loss":"inf"}\n')
        assert proc.stdout.readline() == "step 11/100 loss inf status critical findings 1\n"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
    assert code == 0
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    time.sleep(0)

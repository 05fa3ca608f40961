"""The command line does what a user typing it expects: no silent no-ops, data alone on stdout."""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from lossguard import __version__
from lossguard.cli import _register, app
from lossguard.cli.alert_command import AlertCommandError, parse_command
from lossguard.cli.watch import live
from lossguard.telemetry import EventWriter
from lossguard.watch.follow import RunFollower

ROOT = Path(__file__).resolve().parents[2]
_register()


def _run(run_dir: Path, steps: int = 30) -> None:
    with EventWriter(run_dir / "lossguard" / "events.jsonl", clock=lambda: 1.0) as w:
        w.write("run", max_steps=steps)
        for i in range(1, steps + 1):
            w.write("sample", step=i, loss=math.nan if i == 20 else 2.0, grad_norm=1.0, lr=1e-3)


def test_watch_waits_for_a_run_directory_the_trainer_has_not_created_yet(tmp_path):
    out = tmp_path / "out"
    buf = io.StringIO()
    assert live(str(out), 0.05, max_polls=2, console=Console(file=buf, width=200, color_system=None)) == 0
    assert buf.getvalue() == f"waiting for training to start: {out} does not exist yet\n"
    follower = RunFollower(out, wait_for_dir=True)
    assert follower.poll().waiting == f"waiting for training to start: {out} does not exist yet"
    _run(out)
    batch = follower.poll()
    assert batch.source is not None and batch.source.path == out / "lossguard" / "events.jsonl"
    assert [s.step for s in batch.samples] == list(range(1, 31))
    # the one-shot commands still refuse a missing directory at once
    r = CliRunner().invoke(app, ["watch", str(tmp_path / "nope"), "--once"])
    assert r.exit_code == 1 and str(r.exception) == f"{tmp_path / 'nope'}: no such directory"


def test_on_alert_with_shell_syntax_is_refused_with_the_wrapped_form():
    try:
        parse_command("cat >> alerts.log")
    except AlertCommandError as err:
        assert str(err) == ("--on-alert 'cat >> alerts.log': '>>' is shell syntax, but the command runs without a "
                            "shell; wrap it: --on-alert 'sh -c '\"'\"'cat >> alerts.log'\"'\"''")
    else:
        raise AssertionError("accepted")
    assert parse_command("sh -c 'cat >> alerts.log'") == ["sh", "-c", "cat >> alerts.log"]
    assert parse_command("tee -a alerts.log") == ["tee", "-a", "alerts.log"]
    help_text = CliRunner().invoke(app, ["watch", "--help"], terminal_width=200).output
    assert "run without a shell" in " ".join(help_text.replace("│", " ").split())


def test_export_to_stdout_gives_the_csv_alone(tmp_path):
    _run(tmp_path)
    r = CliRunner().invoke(app, ["export", str(tmp_path), "-o", "-"])
    assert r.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 30 and rows[19]["findings"] == "nonfinite" and rows[0]["loss"] == "2.0"
    assert r.stderr.splitlines()[-1] == "lossguard: wrote 30 steps to stdout"
    assert not (tmp_path / "-").exists() and not Path("-").exists()


def test_progress_lines_go_to_stderr(tmp_path):
    _run(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "lossguard", "report", str(tmp_path), "-o", str(tmp_path / "r.html")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout == ""
    assert f"lossguard: wrote {tmp_path / 'r.html'} (" in r.stderr
    r = CliRunner().invoke(app, ["export", str(tmp_path), "-o", str(tmp_path / "s.csv")])
    assert r.exit_code == 0 and r.stdout == "" and "lossguard: wrote" in r.stderr


def test_version_option():
    r = CliRunner().invoke(app, ["--version"])
    assert (r.exit_code, r.stdout) == (0, f"{__version__}\n")

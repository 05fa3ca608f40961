"""The demo (what `make demo` runs) and the hand-written-loop example, end to end, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lossguard.records import ActionKind
from lossguard.telemetry import open_run

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "COLUMNS": "200"}


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_demo_detects_the_early_plateau_recovers_and_writes_a_report(tmp_path):
    out = tmp_path / "demo-run"
    proc = _run(str(EXAMPLES / "tiny_cpu.py"), "--output-dir", str(out))
    text = proc.stdout + proc.stderr
    log = open_run(out)
    assert log.source == "lossguard" and log.last_step == 600
    plateau = [f for f in log.findings if f.reason.value == "early_convergence"]
    assert plateau and plateau[0].step < 300  # found while the run was still early
    rollbacks = [a for a in log.actions if a.action is ActionKind.ROLLBACK]
    assert rollbacks and rollbacks[0].to_step <= plateau[0].onset_step
    assert any(a.action is ActionKind.LR_RESTORE for a in log.actions)
    # the recovery paid off: the held-out loss ends far below the ~2.9 plateau
    line = next(ln for ln in text.splitlines() if "held-out loss" in ln and "before ->" in ln)
    after = float(line.split("->")[1].split()[0])
    assert after < 2.5
    assert "lossguard summary" in text and "rollback" in text
    assert (out / "lossguard" / "report.html").stat().st_size > 100_000


def test_custom_loop_example_records_and_recovers(tmp_path):
    out = tmp_path / "loop-run"
    proc = _run(str(EXAMPLES / "custom_loop.py"), "--steps", "600", "--out", str(out))
    log = open_run(out)
    assert log.last_step == 600 and len(log.samples) == 600
    assert any(f.reason.value == "early_convergence" for f in log.findings)
    assert any(a.action is ActionKind.ROLLBACK for a in log.actions)
    held_out = float(proc.stdout.split("held-out loss")[1].split()[0])
    assert held_out < 2.5

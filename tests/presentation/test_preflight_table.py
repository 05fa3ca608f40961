"""The preflight table rendered into a fixed-width console."""

from __future__ import annotations

import io

from rich.console import Console

from lossguard.preflight import PreflightReport, PreflightRow, Status
from lossguard.presentation.preflight_table import preflight_table


def render(report: PreflightReport, width: int = 120) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, highlight=False).print(preflight_table(report))
    return out.getvalue()


def test_rows_statuses_and_advice_are_rendered():
    report = PreflightReport(rows=[
        PreflightRow("effective batch", "16 sequences per optimizer step"),
        PreflightRow("loss printed", "every 20 steps", Status.INFO, "lossguard records every step"),
        PreflightRow("checkpoints", "every 200 steps, keeps all", Status.WARN, "set save_steps=100"),
    ])
    text = render(report)
    lines = text.splitlines()
    assert "lossguard preflight" in lines[0]
    row = next(line for line in lines if "checkpoints" in line)
    assert "every 200 steps, keeps all" in row and "warn" in row and "set save_steps=100" in row
    assert "ok" in next(line for line in lines if "effective batch" in line)
    assert "info" in next(line for line in lines if "loss printed" in line)
    assert "1 warning" in text and "1 warnings" not in text


def test_long_advice_wraps_inside_the_width():
    advice = "word " * 80
    text = render(PreflightReport(rows=[PreflightRow("tokens vs parameters", "2 vs 10", Status.WARN, advice)]),
                  width=80)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert text.count("word") == 80


def test_empty_report_says_no_warnings():
    text = render(PreflightReport())
    assert "no warnings" in text

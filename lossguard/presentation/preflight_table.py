"""The preflight report as one rich table: check, value, status, and what to change."""

from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from lossguard.preflight import PreflightReport, Status

_STATUS_STYLE = {Status.OK: "green", Status.INFO: "cyan", Status.WARN: "bold yellow"}


def preflight_table(report: PreflightReport, *, title: str = "lossguard preflight") -> Table:
    """A table with one row per check; warn rows carry the advice in the last column."""
    warn_count = sum(1 for r in report.rows if r.status is Status.WARN)
    caption = f"{warn_count} warning{'s' if warn_count != 1 else ''}" if warn_count else "no warnings"
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, show_lines=False, expand=False)
    table.add_column("check", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold", ratio=2)
    table.add_column("status", no_wrap=True)
    table.add_column("what to change / note", overflow="fold", ratio=3)
    for row in report.rows:
        status = Text(row.status.value, style=_STATUS_STYLE.get(row.status, ""))
        table.add_row(Text(row.name), Text(row.value), status, Text(row.advice))
    return table

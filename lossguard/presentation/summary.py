"""A short end-of-run summary: steps, loss, gradient norm and LR ranges, findings and actions."""

from __future__ import annotations

import math

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table

from lossguard.numbers import fmt
from lossguard.telemetry.runlog import RunLog


def _range(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    return f"{fmt(min(finite))} .. {fmt(max(finite))}"


def run_summary(log: RunLog, *, extra: dict[str, str] | None = None) -> RenderableType:
    """A table of the run's key figures plus the findings and actions, one line each."""
    table = Table(title="lossguard summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    s = log.samples
    losses = [x.loss for x in s if x.loss is not None]
    table.add_row("log", f"{log.path} ({log.source})")
    table.add_row("steps", f"{len(s)} recorded, last step {log.last_step if s else '-'}"
                  + (f" of {log.max_steps}" if log.max_steps else ""))
    if losses:
        nonfinite = sum(1 for v in losses if not math.isfinite(v))
        table.add_row("loss first / last", f"{fmt(losses[0])} / {fmt(losses[-1])}"
                      + (f"  ({nonfinite} non-finite)" if nonfinite else ""))
    table.add_row("grad norm range", _range([x.grad_norm for x in s if x.grad_norm is not None]))
    table.add_row("lr range", _range([x.lr for x in s if x.lr is not None]))
    for key, value in (extra or {}).items():
        table.add_row(key, value)
    table.add_row("findings", str(len(log.findings)))
    table.add_row("actions", str(len(log.actions)))
    lines: list[RenderableType] = [table]
    for f in log.findings:
        lines.append(f"  [yellow]finding[/] step {f.step}: [bold]{f.reason.value}[/] {escape(f.message)}")
    for a in log.actions:
        lines.append(f"  [magenta]action[/]  step {a.step}: [bold]{a.action.value}[/] {escape(a.message)}")
    return Group(*lines)

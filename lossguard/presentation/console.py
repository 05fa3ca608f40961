"""One-line console notices for findings and actions, as they happen during training."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.measure import Measurement

from lossguard.records import Action, Finding, Severity

_STYLE = {Severity.INFO: "cyan", Severity.WARNING: "yellow", Severity.CRITICAL: "bold red"}

_console: Console | None = None


def console() -> Console:
    """The shared stderr console (stdout stays the user's)."""
    global _console
    if _console is None:
        # a training log redirected to a file keeps one line per finding instead of 80-column wraps
        _console = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())
    return _console


def stdout_console() -> Console:
    """A console for a command's output: wrapped to the terminal's width, but one line per item
    when piped into a file or a CI log (rich would otherwise wrap at 80 columns; grep needs lines)."""
    return Console(highlight=False, soft_wrap=not sys.stdout.isatty())


def end_line(log: Path, step: int, findings: int, actions: int) -> str:
    """The last line of a run: where its log is and the two commands that read it."""
    run = shlex.quote(str(log.parent.parent))
    what = f"{findings} finding{'s' if findings != 1 else ''}, {actions} action{'s' if actions != 1 else ''}"
    return (f"lossguard: training ended at step {step} ({what}); log {log}; "
            f"look with: lossguard watch {run} --once  or  lossguard report {run}")


def print_fitted(out: Console, renderable: RenderableType, *, cap: int = 200) -> None:
    """Print a table at the width of its content when the console is no terminal (a CI log, a
    file): rich would otherwise force 80 columns and wrap every cell. A terminal keeps its size."""
    if out.is_terminal:
        out.print(renderable)
        return
    natural = Measurement.get(out, out.options.update_width(cap), renderable).maximum
    # ``print(width=...)`` cannot go past the console's own width: a console of that width can
    wide = Console(file=out.file, width=max(40, min(cap, natural)), highlight=False,
                   color_system=out.color_system, no_color=out.no_color)  # type: ignore[arg-type]
    wide.print(renderable)


def finding_line(f: Finding) -> str:
    style = _STYLE.get(f.severity, "white")
    return f"[{style}]lossguard {f.severity.value}[/] [bold]{f.reason.value}[/] {escape(f.message)}"


def action_line(a: Action) -> str:
    return f"[magenta]lossguard action[/] [bold]{a.action.value}[/] {escape(a.message)}"


def print_finding(f: Finding, out: Console | None = None) -> None:
    (out or console()).print(finding_line(f))


def print_action(a: Action, out: Console | None = None) -> None:
    (out or console()).print(action_line(a))

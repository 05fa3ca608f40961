"""One-line console notices for findings and actions, as they happen during training."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

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


def finding_line(f: Finding) -> str:
    style = _STYLE.get(f.severity, "white")
    return f"[{style}]lossguard {f.severity.value}[/] [bold]{f.reason.value}[/] {escape(f.message)}"


def action_line(a: Action) -> str:
    return f"[magenta]lossguard action[/] [bold]{a.action.value}[/] {escape(a.message)}"


def print_finding(f: Finding, out: Console | None = None) -> None:
    (out or console()).print(finding_line(f))


def print_action(a: Action, out: Console | None = None) -> None:
    (out or console()).print(action_line(a))

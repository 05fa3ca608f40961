"""``lossguard watch RUN_DIR --once``: analyse a run's log once, print a summary, exit."""

from __future__ import annotations

import json

from lossguard.analysis import STATUSES, analyze, status_at_least
from lossguard.errors import LossguardError
from lossguard.telemetry import open_run


def once(run_dir: str, as_json: bool, fail_on: str | None) -> int:
    """Analyse ``run_dir`` and print the result; the exit code says whether it is bad enough.

    Returns 1 when the run's status is at least ``fail_on`` ("warning" or "critical"), else 0.

    Raises:
        LossguardError: ``fail_on`` is not a status, or the run has no readable log.
    """
    if fail_on is not None and fail_on not in STATUSES[1:]:
        raise LossguardError(f"--fail-on {fail_on!r}: expected 'warning' or 'critical'")
    log = open_run(run_dir, columns=True)
    result = analyze(log)
    if as_json:
        print(json.dumps(result.to_json(run_dir), allow_nan=False))
    else:
        _print_text(run_dir, result)
    return 1 if fail_on is not None and status_at_least(result.status, fail_on) else 0


def _print_text(run_dir: str, result) -> None:  # type: ignore[no-untyped-def]
    from lossguard.presentation.console import stdout_console

    console = stdout_console()
    colour = {"healthy": "green", "warning": "yellow", "critical": "red"}[result.status]
    console.print(
        f"[bold]{run_dir}[/bold] ({result.source}): {result.steps} samples, last step "
        f"{result.last_step}, status [{colour}]{result.status}[/{colour}]"
    )
    for f in result.findings:
        style = {"info": "dim", "warning": "yellow", "critical": "red"}[f.severity.value]
        console.print(f"  [{style}]{f.severity.value:<8}[/{style}] {f.reason.value:<24} {f.message}")
    for a in result.actions:
        console.print(f"  action   {a.action.value:<24} {a.message}")
    if not result.findings:
        console.print("  no findings")

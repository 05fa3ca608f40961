"""``lossguard watch RUN_DIR --once``: analyse a run's log once, print a summary, exit."""

from __future__ import annotations

import json

from lossguard.analysis import Analysis, analyze
from lossguard.errors import LossguardError
from lossguard.status import FAIL_ON, RunStatus
from lossguard.telemetry import open_run

STATUS_COLOUR = {RunStatus.NO_DATA: "magenta", RunStatus.HEALTHY: "green", RunStatus.RECOVERED: "cyan",
                 RunStatus.WARNING: "yellow", RunStatus.CRITICAL: "red"}


def once(run_dir: str, as_json: bool, fail_on: str | None) -> int:
    """Analyse ``run_dir`` and print the result; the exit code says whether it is bad enough.

    Returns 1 when ``--fail-on`` fails the run (``lossguard.status.StatusVerdict.fails``: a run
    with no samples always does), else 0.

    Raises:
        LossguardError: ``fail_on`` is not a level, or the run has no readable log.
    """
    if fail_on is not None and fail_on not in FAIL_ON:
        raise LossguardError(f"--fail-on {fail_on!r}: expected one of {', '.join(FAIL_ON)}")
    log = open_run(run_dir, columns=True)
    result = analyze(log)
    if as_json:
        print(json.dumps(result.to_json(run_dir), allow_nan=False))
    else:
        _print_text(run_dir, result)
    return 1 if fail_on is not None and result.verdict.fails(fail_on) else 0


def _print_text(run_dir: str, result: Analysis) -> None:
    from lossguard.presentation.console import stdout_console

    console = stdout_console()
    verdict = result.verdict
    colour = STATUS_COLOUR[verdict.status]
    console.print(
        f"[bold]{run_dir}[/bold] ({result.source}): {result.steps} samples, last step "
        f"{result.last_step}, status [{colour}]{verdict.status.value}[/{colour}]"
    )
    for f in result.findings:
        style = {"info": "dim", "warning": "yellow", "critical": "red"}[f.severity.value]
        console.print(f"  [{style}]{f.severity.value:<8}[/{style}] {f.reason.value:<24} {f.message}")
    for a in result.actions:
        console.print(f"  action   {a.action.value:<24} {a.message}")
    if not result.findings:
        console.print("  no findings")
    if verdict.handled:
        console.print("  handled: " + ", ".join(f"{f.reason.value} at step {f.step}" for f in verdict.handled))
    if verdict.open and verdict.handled:
        console.print("  still open: " + ", ".join(f"{f.reason.value} at step {f.step}" for f in verdict.open))
    if verdict.unfinished:
        console.print(f"  {verdict.unfinished}")
    for off in verdict.checks_off:
        console.print(f"  check off: {off}")

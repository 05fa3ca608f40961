"""``lossguard watch RUN_DIR``: live dashboard, one-shot analysis, or background daemon."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from lossguard.errors import LossguardError
from lossguard.records import Severity

if TYPE_CHECKING:
    from rich.console import Console

_ALERT_LEVELS = ("info", "warning", "critical")


def _check(once: bool, as_json: bool, fail_on: str | None, daemon: bool, stop: bool,
           on_alert: str | None, refresh: float, report_every: float) -> bool:
    """Refuse what cannot be combined; returns whether the call means ``--once``.

    ``--fail-on`` or ``--json`` without a mode imply ``--once``: the live dashboard runs until
    Ctrl-C and prints no verdict, so a CI job that forgot ``--once`` would otherwise hang.
    """
    from lossguard.status import FAIL_ON

    modes = [name for name, on in (("--once", once), ("--daemon", daemon), ("--stop", stop)) if on]
    if len(modes) > 1:
        raise LossguardError(f"{' and '.join(modes)} cannot be combined; pick one")
    if as_json and (daemon or stop):
        raise LossguardError("--json needs --once (the daemon does not print JSON)")
    if on_alert is not None and not daemon:
        raise LossguardError("--on-alert needs --daemon")
    if fail_on is not None and daemon and fail_on not in _ALERT_LEVELS:
        raise LossguardError(f"--fail-on {fail_on!r}: with --daemon, the alert level; expected one of "
                             f"{', '.join(_ALERT_LEVELS)}")
    if fail_on is not None and fail_on not in FAIL_ON:
        raise LossguardError(f"--fail-on {fail_on!r}: expected one of {', '.join(FAIL_ON)}")
    if not (0.05 <= refresh <= 3600):
        raise LossguardError(f"--refresh {refresh:g}: expected 0.05 to 3600 seconds")
    if not (1 <= report_every <= 86400):
        raise LossguardError(f"--report-every {report_every:g}: expected 1 to 86400 seconds")
    return once or (not modes and (fail_on is not None or as_json))


def command(run_dir: str, once: bool = False, as_json: bool = False, fail_on: str | None = None,
            daemon: bool = False, stop: bool = False, on_alert: str | None = None, refresh: float = 1.0,
            report_every: float = 60.0) -> int:
    """Watch a run. Returns the exit code (0 ok, 1 findings over --fail-on, 2 user error).

    With ``--daemon``, ``--fail-on`` sets the alert level (default: warning). Without a mode,
    ``--fail-on`` and ``--json`` imply ``--once`` (said on stderr).
    """
    implied = _check(once, as_json, fail_on, daemon, stop, on_alert, refresh, report_every)
    if implied:
        from lossguard.cli.watch_once import once as run_once

        if not once:
            flag = "--fail-on" if fail_on is not None else "--json"
            print(f"lossguard: {flag} implies --once (one analysis, then exit)", file=sys.stderr)
        return run_once(run_dir, as_json, fail_on)
    if stop:
        from lossguard.cli import watch_daemon as d

        pid = d.stop(run_dir)
        print(f"lossguard: stopped the daemon (pid {pid}) watching {run_dir}")
        return 0
    if daemon:
        from lossguard.cli import watch_daemon as d

        level = Severity(fail_on) if fail_on else Severity.WARNING
        pid, paths = d.start(run_dir, refresh=refresh, report_every=report_every, on_alert=on_alert,
                             alert_level=level)
        print(f"lossguard: daemon started (pid {pid}) watching {run_dir}; log {paths.log}, "
              f"alerts {paths.alerts}, report {paths.report}; stop with: lossguard watch {run_dir} --stop")
        return 0
    return live(run_dir, refresh)


def live(run_dir: str, refresh: float, *, max_polls: int | None = None, console: Console | None = None) -> int:
    """The live dashboard until Ctrl-C (or ``max_polls`` polls, for tests)."""
    from rich.console import Console
    from rich.live import Live

    from lossguard.presentation.dashboard import render, summary_line
    from lossguard.watch.follow import RunFollower
    from lossguard.watch.live import LiveRun

    follower = RunFollower(run_dir, wait_for_dir=True)
    state = LiveRun(follower.run_dir)
    console = console or Console(highlight=False)
    polls = 0

    def step() -> bool:
        nonlocal polls
        changed = False
        started = time.monotonic()
        while True:
            batch = follower.poll()
            state.fold(batch)
            changed = changed or not batch.empty or batch.waiting != getattr(step, "waiting", None)
            step.waiting = batch.waiting  # type: ignore[attr-defined]
            if not batch.behind:
                break
            if time.monotonic() - started > 0.5:  # a big log: show progress instead of a frozen screen
                done, size = follower.progress or (0, 0)
                state.waiting = f"catching up: read {done / 1e6:,.0f} of {size / 1e6:,.0f} MB"
                break
        polls += 1
        return changed

    try:
        if not console.is_terminal:
            # piped or redirected: one plain line per change instead of a redrawn screen
            said = None
            while max_polls is None or polls < max_polls:
                step()
                for note in list(state.notes):
                    console.print(f"lossguard: {note}", markup=False, soft_wrap=True)
                state.notes.clear()
                line = state.waiting if state.last is None and state.waiting else summary_line(state)
                if line != said:
                    console.print(line, markup=False, soft_wrap=True)
                    said = line
                time.sleep(refresh)
            return 0
        step()
        drawn_at = time.monotonic()
        with Live(render(state, width=console.width), console=console, auto_refresh=False,
                  redirect_stdout=False, redirect_stderr=False) as view:
            while max_polls is None or polls < max_polls:
                time.sleep(refresh)
                changed = step()
                # idle runs redraw rarely: the only moving part is the "updated ... ago" clock
                if changed or time.monotonic() - drawn_at >= 10:
                    view.update(render(state, width=console.width), refresh=True)
                    drawn_at = time.monotonic()
    except KeyboardInterrupt:
        print("", file=sys.stderr)
    return 0

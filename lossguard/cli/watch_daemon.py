"""``lossguard watch RUN_DIR --daemon``: a background watcher that alerts and keeps a report fresh.

The daemon is a separate process in its own session (it survives the terminal that started it).
It keeps its pidfile, its log, ``alerts.jsonl`` and ``report.html`` in ``RUN_DIR/lossguard/``.
Each new finding at or above the alert level is appended to ``alerts.jsonl`` and, with
``--on-alert CMD``, handed to ``CMD`` as one JSON object on stdin. ``CMD`` is split with
``shlex`` and run without a shell, so nothing from the log is ever interpreted as shell code.
SIGTERM (or ``lossguard watch RUN_DIR --stop``) stops it cleanly: final report, pidfile removed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lossguard.cli.alert_command import parse_command
from lossguard.errors import LogReadError, LossguardError
from lossguard.records import Finding, Severity
from lossguard.telemetry.schema import SCHEMA_VERSION, encode
from lossguard.telemetry.source import check_run_dir
from lossguard.watch.alert_book import AlertBook
from lossguard.watch.silence import Silence, stalled_alert

ALERT_COMMAND_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
START_TIMEOUT_S = 15.0


class DaemonError(LossguardError):
    """The daemon could not be started or stopped (one already runs, none runs, ...)."""


@dataclass(frozen=True)
class DaemonPaths:
    """Where the daemon of one run keeps its files."""

    dir: Path

    @property
    def pidfile(self) -> Path:
        return self.dir / "watch.pid"

    @property
    def log(self) -> Path:
        return self.dir / "watch.log"

    @property
    def alerts(self) -> Path:
        return self.dir / "alerts.jsonl"

    @property
    def report(self) -> Path:
        return self.dir / "report.html"


def daemon_paths(run_dir: str | os.PathLike[str], subdir: str = "lossguard") -> DaemonPaths:
    return DaemonPaths(Path(run_dir) / subdir)


def pid_alive(pid: int) -> bool:
    """True when ``pid`` is a running (not zombie) lossguard process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        os.waitpid(pid, os.WNOHANG)  # reaps it if it is our own finished child
    except ChildProcessError:
        pass
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            stat = (proc / "stat").read_text()
            if stat[stat.rfind(")") + 2:].startswith(("Z", "X")):
                return False
            # a pid reused by an unrelated process after a crash leaves a stale pidfile
            return b"lossguard" in (proc / "cmdline").read_bytes()
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def read_pid(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process still runs, else None."""
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    try:
        pid = int(text.split()[0])
    except (ValueError, IndexError):
        return None
    return pid if pid > 0 and pid_alive(pid) else None


def _running_message(run_dir: Path, pid: int) -> str:
    return (f"a lossguard daemon (pid {pid}) already watches {run_dir}; "
            f"stop it first with: lossguard watch {shlex.quote(str(run_dir))} --stop")


def acquire_pidfile(pidfile: Path, run_dir: Path) -> None:
    """Write our pid to ``pidfile`` atomically; refuse when a live daemon holds it."""
    for _ in range(2):
        try:
            fd = os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pid = read_pid(pidfile)
            if pid is not None and pid != os.getpid():
                raise DaemonError(_running_message(run_dir, pid)) from None
            pidfile.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        return
    raise DaemonError(f"{pidfile}: could not be created (another daemon starting at the same time?)")


def alert_record(f: Finding, run_dir: Path, now: float) -> dict[str, Any]:
    return {"v": SCHEMA_VERSION, "t": round(now, 3), **f.to_record(), "kind": "alert", "run_dir": str(run_dir)}


class Daemon:
    """The watch loop: follow, detect, alert, report; until ``stop()``.

    Args:
        run_dir: the run to watch (must exist).
        refresh: seconds between polls of the log.
        report_every: seconds between rewrites of ``report.html`` (only when something changed).
        on_alert: argv run per alert with the alert JSON on stdin, or None.
        alert_level: the least severe finding that alerts.
        stall_after: seconds without a new record (the run not ended) before a ``stalled`` alert;
            default: ``watch.silence.STALL_AFTER_S`` or ``STALL_STEPS`` steps at the recent pace, the longer.

    Alerts are de-duplicated by (reason, step) within one log: a log replaced by a fresh run's
    (another first ``run`` record) gets alerts of its own.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, refresh: float = 1.0, report_every: float = 60.0,
                 on_alert: list[str] | None = None, alert_level: Severity = Severity.WARNING,
                 subdir: str = "lossguard", log: IO[str] | None = None,
                 clock: Callable[[], float] = time.time, stall_after: float | None = None) -> None:
        self.run_dir = check_run_dir(run_dir)
        self.paths = daemon_paths(self.run_dir, subdir)
        self.refresh = refresh
        self.report_every = report_every
        self.on_alert = on_alert
        self.alert_level = alert_level
        self.subdir = subdir
        self._log = log or sys.stderr
        self._clock = clock
        self._stop = threading.Event()
        self.alerts_sent = 0
        self.reports_written = 0
        self.stall_after = stall_after

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def say(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self._clock()))
        try:
            self._log.write(f"{stamp} {message}\n")
            self._log.flush()
        except (OSError, ValueError):
            pass

    def _alert(self, f: Finding, log_id: str | None = None) -> None:
        self._send(alert_record(f, self.run_dir, self._clock()) | {"log_id": log_id},
                   f"ALERT {f.severity.value} {f.reason.value} at step {f.step}: {f.message}")

    def _send(self, record: dict[str, Any], said: str) -> None:
        line = encode(record)
        try:
            with open(self.paths.alerts, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        except OSError as err:
            self.say(f"cannot append to {self.paths.alerts}: {err.strerror or err}")
        self.alerts_sent += 1
        self.say(said)
        if self.on_alert is None:
            return
        try:
            done = subprocess.run(self.on_alert, input=(line + "\n").encode(), stdout=self._log, stderr=self._log,
                                  timeout=ALERT_COMMAND_TIMEOUT_S, check=False, close_fds=True)
            if done.returncode != 0:
                self.say(f"--on-alert command exited with {done.returncode}")
        except subprocess.TimeoutExpired:
            self.say(f"--on-alert command killed after {ALERT_COMMAND_TIMEOUT_S:.0f} s")
        except OSError as err:
            self.say(f"--on-alert command failed to start: {err.strerror or err}")

    def _write_report(self, live: Any) -> None:
        from lossguard.presentation.report import render_html

        tmp = self.paths.report.with_name(f".{self.paths.report.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(render_html(live), encoding="utf-8")
            os.replace(tmp, self.paths.report)
            self.reports_written += 1
        except OSError as err:
            self.say(f"cannot write {self.paths.report}: {err.strerror or err}")
            tmp.unlink(missing_ok=True)

    def run(self) -> int:
        """Watch until stopped; 0 on a clean stop."""
        from lossguard.presentation.dashboard import summary_line
        from lossguard.watch.follow import RunFollower
        from lossguard.watch.live import LiveRun

        follower = RunFollower(self.run_dir, subdir=self.subdir)
        live = LiveRun(self.run_dir)
        book = AlertBook.read(self.paths.alerts)
        quiet = Silence()
        self.say(f"watching {self.run_dir} every {self.refresh:g} s (pid {os.getpid()}); "
                 f"alerts -> {self.paths.alerts}, report -> {self.paths.report} every {self.report_every:g} s")
        next_report = 0.0
        dirty = True
        waiting_said: str | None = None
        last_error: str | None = None
        while not self._stop.is_set():
            try:
                while True:
                    batch = follower.poll()
                    book.follow(batch)
                    for f in live.fold(batch):
                        if f.severity.rank >= self.alert_level.rank and book.first_time(f):
                            self._alert(f, book.log_id)
                    if batch.samples or batch.records:
                        quiet.heard(self._clock(), self.say)
                    for note in batch.notes:
                        self.say(note)
                    if batch.waiting and batch.waiting != waiting_said:
                        self.say(batch.waiting)
                    waiting_said = batch.waiting
                    dirty = dirty or not batch.empty
                    last_error = None
                    if not batch.behind or self._stop.is_set():
                        break
            except Exception as err:  # a LossguardError or a surprise: said once, the daemon keeps watching
                text = str(err) if isinstance(err, LossguardError) else f"{type(err).__name__}: {err}"
                if text != last_error:
                    self.say(f"error: {text}; retrying every {self.refresh:g} s")
                last_error = text
            now = self._clock()
            silent = quiet.check(now, live, self.stall_after)
            if silent is not None and self.alert_level.rank <= Severity.WARNING.rank:
                self._send(stalled_alert(silent, now, live, self.run_dir, book.log_id), f"ALERT warning stalled: {silent}")
            if dirty and now >= next_report and live.source_kind is not None:
                self._write_report(live)
                self.say(f"report refreshed: {summary_line(live)}")
                next_report = now + self.report_every
                dirty = False
            self._stop.wait(self.refresh)
        if live.source_kind is not None:
            self._write_report(live)
        self.say(f"stopped after {self.alerts_sent} alert(s), {self.reports_written} report(s)")
        return 0


def serve(argv: list[str] | None = None) -> int:
    """The daemon process's entry point (``python -m lossguard.cli.watch_daemon``)."""
    ap = argparse.ArgumentParser(prog="lossguard-watch-daemon")
    ap.add_argument("run_dir")
    ap.add_argument("--refresh", type=float, default=1.0)
    ap.add_argument("--report-every", type=float, default=60.0)
    ap.add_argument("--on-alert", default=None)
    ap.add_argument("--alert-level", default="warning")
    ap.add_argument("--stall-after", type=float, default=None)
    a = ap.parse_args(argv)
    run_dir = Path(a.run_dir)
    paths = daemon_paths(run_dir)
    try:
        paths.dir.mkdir(parents=True, exist_ok=True)
        acquire_pidfile(paths.pidfile, run_dir)
    except (LossguardError, OSError) as err:
        print(f"lossguard: error: {err}", file=sys.stderr, flush=True)
        return 2
    try:
        daemon = Daemon(run_dir, refresh=a.refresh, report_every=a.report_every,
                        on_alert=shlex.split(a.on_alert) if a.on_alert else None,
                        alert_level=Severity(a.alert_level), log=sys.stderr, stall_after=a.stall_after)
        signal.signal(signal.SIGTERM, daemon.stop)
        signal.signal(signal.SIGINT, daemon.stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return daemon.run()
    except LossguardError as err:
        print(f"lossguard: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if read_pid(paths.pidfile) in (os.getpid(), None):
            paths.pidfile.unlink(missing_ok=True)


def start(run_dir: str | os.PathLike[str], *, refresh: float, report_every: float, on_alert: str | None,
          alert_level: Severity = Severity.WARNING) -> tuple[int, DaemonPaths]:
    """Start the daemon detached from this terminal; returns its pid once it holds the pidfile.

    Raises:
        DaemonError: a daemon already watches the run, the command is unusable, or the daemon
            failed to start (its first error line is in the message).
    """
    rd = check_run_dir(run_dir)
    paths = daemon_paths(rd)
    pid = read_pid(paths.pidfile)
    if pid is not None:
        raise DaemonError(_running_message(rd, pid))
    if on_alert is not None:
        parse_command(on_alert)
    try:
        paths.dir.mkdir(parents=True, exist_ok=True)
        logfh = open(paths.log, "a", encoding="utf-8")
    except OSError as err:
        raise LogReadError(f"{paths.dir}: cannot write the daemon's files ({err.strerror or err})") from None
    argv = [sys.executable, "-m", "lossguard.cli.watch_daemon", str(rd.resolve()), "--refresh", repr(refresh),
            "--report-every", repr(report_every), "--alert-level", alert_level.value]
    if on_alert is not None:
        argv += ["--on-alert", on_alert]
    size_before = paths.log.stat().st_size
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    with logfh:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logfh, stderr=logfh, env=env,
                                start_new_session=True, close_fds=True, cwd="/")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if read_pid(paths.pidfile) == proc.pid:
            return proc.pid, paths
        if proc.poll() is not None:
            raise DaemonError(_first_error(paths.log, size_before) or
                              f"the daemon exited at once with status {proc.returncode}; see {paths.log}")
        time.sleep(0.05)
    raise DaemonError(f"the daemon did not start within {START_TIMEOUT_S:.0f} s; see {paths.log}")


def _first_error(log: Path, offset: int) -> str | None:
    try:
        with open(log, encoding="utf-8", errors="replace") as fh:
            fh.seek(offset)
            for line in fh:
                if "error:" in line:
                    return line.split("error:", 1)[1].strip()
    except OSError:
        pass
    return None


def stop(run_dir: str | os.PathLike[str], *, timeout: float = STOP_TIMEOUT_S) -> int:
    """Stop the daemon watching ``run_dir``; returns its pid.

    Raises:
        DaemonError: no daemon watches the run, or it did not stop within ``timeout``.
    """
    rd = check_run_dir(run_dir)
    paths = daemon_paths(rd)
    pid = read_pid(paths.pidfile)
    if pid is None:
        stale = paths.pidfile.exists()
        paths.pidfile.unlink(missing_ok=True)
        raise DaemonError(f"no lossguard daemon watches {rd}" + (" (removed a stale pidfile)" if stale else ""))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return pid
        time.sleep(0.05)
    raise DaemonError(f"the daemon (pid {pid}) did not stop within {timeout:.0f} s; kill it with: kill -9 {pid}")


if __name__ == "__main__":
    sys.exit(serve())

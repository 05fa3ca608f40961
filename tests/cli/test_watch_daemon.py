"""The watch daemon for real: detached process, growing log, alert with on-alert command, report, stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lossguard.cli.watch_daemon import daemon_paths, pid_alive, read_pid

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lossguard", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _wait(cond, timeout: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _append(path: Path, recs: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")


def test_daemon_alerts_reports_refuses_a_second_and_stops(tmp_path: Path) -> None:
    run = tmp_path / "run"
    events = run / "lossguard" / "events.jsonl"
    events.parent.mkdir(parents=True)
    _append(events, [{"v": 1, "t": 1.0, "kind": "run", "max_steps": 100}] +
            [{"v": 1, "t": 1.0 + i, "kind": "sample", "step": i, "loss": 2.0, "grad_norm": 1.0} for i in range(1, 21)])
    got = tmp_path / "alert-stdin.json"
    hook = f"{sys.executable} -c \"import sys; open({str(got)!r}, 'w').write(sys.stdin.read())\""
    paths = daemon_paths(run)
    started = _cli("watch", str(run), "--daemon", "--refresh", "0.1", "--report-every", "1", "--on-alert", hook)
    assert started.returncode == 0, started.stderr
    assert "daemon started (pid" in started.stdout
    pid = read_pid(paths.pidfile)
    assert pid is not None and pid_alive(pid)
    try:
        # first report once the existing log is read
        assert _wait(lambda: paths.report.exists()), paths.log.read_text()
        first_mtime = paths.report.stat().st_mtime_ns
        # the run grows: a NaN loss at step 21
        _append(events, [{"v": 1, "t": 30.0, "kind": "sample", "step": 21, "loss": "nan", "grad_norm": 1.0},
                         {"v": 1, "t": 31.0, "kind": "sample", "step": 22, "loss": 2.0, "grad_norm": 1.0}])
        assert _wait(lambda: got.exists() and got.read_text().endswith("\n")), paths.log.read_text()
        alert = json.loads(got.read_text())
        assert (alert["kind"], alert["reason"], alert["severity"], alert["step"]) == ("alert", "nonfinite", "critical", 21)
        assert alert["run_dir"] == str(run.resolve())
        lines = paths.alerts.read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [21]
        assert _wait(lambda: paths.report.stat().st_mtime_ns != first_mtime)
        assert "nonfinite" in paths.report.read_text()
        # a second daemon on the same run is refused, clearly
        second = _cli("watch", str(run), "--daemon")
        assert second.returncode == 2
        assert second.stderr.strip() == (
            f"lossguard: error: a lossguard daemon (pid {pid}) already watches {run}; "
            f"stop it first with: lossguard watch {run} --stop")
        assert "Traceback" not in second.stderr
    finally:
        stopped = _cli("watch", str(run), "--stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped the daemon (pid {pid})" in stopped.stdout
    assert not pid_alive(pid)
    assert not paths.pidfile.exists()
    log = paths.log.read_text()
    assert "ALERT critical nonfinite at step 21" in log and "stopped after 1 alert(s)" in log
    again = _cli("watch", str(run), "--stop")
    assert again.returncode == 2 and again.stderr.strip() == f"lossguard: error: no lossguard daemon watches {run}"


def test_daemon_rejects_an_unusable_on_alert_command(tmp_path: Path) -> None:
    r = _cli("watch", str(tmp_path), "--daemon", "--on-alert", "no-such-program-xyz --flag")
    assert r.returncode == 2
    assert r.stderr.strip() == "lossguard: error: --on-alert: program 'no-such-program-xyz' not found or not executable"
    r = _cli("watch", str(tmp_path), "--daemon", "--on-alert", "echo 'unbalanced")
    assert r.returncode == 2 and "cannot be parsed" in r.stderr
    assert not daemon_paths(tmp_path).pidfile.exists()


def test_stale_pidfile_is_replaced(tmp_path: Path) -> None:
    paths = daemon_paths(tmp_path)
    paths.dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    paths.pidfile.write_text(f"{dead.pid}\n")
    assert read_pid(paths.pidfile) is None
    r = _cli("watch", str(tmp_path), "--daemon", "--refresh", "0.2")
    assert r.returncode == 0, r.stderr
    pid = read_pid(paths.pidfile)
    assert pid is not None and pid != dead.pid
    # the run has not started: the daemon says it waits
    assert _wait(lambda: "waiting for training to start" in paths.log.read_text())
    assert _cli("watch", str(tmp_path), "--stop").returncode == 0
    assert not pid_alive(pid)


@pytest.mark.parametrize("sig_name", ["SIGTERM"])
def test_sigterm_stops_cleanly(tmp_path: Path, sig_name: str) -> None:
    import signal

    r = _cli("watch", str(tmp_path), "--daemon", "--refresh", "0.2")
    assert r.returncode == 0, r.stderr
    paths = daemon_paths(tmp_path)
    pid = read_pid(paths.pidfile)
    assert pid is not None
    os.kill(pid, getattr(signal, sig_name))
    assert _wait(lambda: not pid_alive(pid))
    assert not paths.pidfile.exists()
    assert "stopped after 0 alert(s)" in paths.log.read_text()


def test_daemon_notices_silence_and_a_replaced_log_gets_its_own_alerts(tmp_path: Path) -> None:
    """Training that stops writing (killed, hung) gets one ``stalled`` alert; a fresh run whose log
    replaces the first one's alerts again at the same (reason, step)."""
    import threading

    from lossguard.cli.watch_daemon import Daemon
    from lossguard.telemetry.writer import set_aside

    run = tmp_path / "run"
    events = run / "lossguard" / "events.jsonl"
    events.parent.mkdir(parents=True)

    def write_run(t0: float) -> None:
        _append(events, [{"v": 1, "t": t0, "kind": "run", "max_steps": 100, "start_step": 0}] +
                [{"v": 1, "t": t0 + i, "kind": "sample", "step": i, "loss": 2.0, "grad_norm": 1.0} for i in range(1, 21)] +
                [{"v": 1, "t": t0 + 21, "kind": "sample", "step": 21, "loss": "nan", "grad_norm": 1.0}])

    def alerts() -> list[dict]:
        return [json.loads(x) for x in daemon_paths(run).alerts.read_text().splitlines()] \
            if daemon_paths(run).alerts.exists() else []

    write_run(1000.0)
    said = run / "lossguard" / "watch.log"
    with open(said, "a", encoding="utf-8") as log:
        daemon = Daemon(run, refresh=0.05, report_every=3600, log=log, stall_after=1.0)
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        try:
            assert _wait(lambda: [a["reason"] for a in alerts()] == ["nonfinite", "stalled"], 30), said.read_text()
            stalled = alerts()[1]
            assert stalled["step"] == 21 and "no record for" in stalled["message"] and "has not ended" in stalled["message"]
            _append(events, [{"v": 1, "t": 1030.0, "kind": "sample", "step": 22, "loss": 2.0, "grad_norm": 1.0},
                             {"v": 1, "t": 1031.0, "kind": "end", "step": 22}])
            assert _wait(lambda: "written again" in said.read_text(), 30)
            set_aside(events)  # what a fresh run in the same output_dir does first
            write_run(5000.0)
            assert _wait(lambda: [a["reason"] for a in alerts()].count("nonfinite") == 2, 30), said.read_text()
            first, second = [a for a in alerts() if a["reason"] == "nonfinite"]
            assert first["step"] == second["step"] == 21 and first["log_id"] != second["log_id"]
        finally:
            daemon.stop()
            thread.join(10)
    assert not thread.is_alive()
    assert [a["reason"] for a in alerts()].count("stalled") <= 2  # once per silence, never per poll

"""Watcher and report costs: `--once` on a big log, refresh cost vs file size, idle CPU, report size/render.

    python benchmarks/watch.py                 # 1,000,000 records (a few minutes on 2 cores)
    python benchmarks/watch.py --records 100000 --idle-seconds 10
    python benchmarks/watch.py --once-only      # only `watch --once --json` on 1M records, 3 runs

Prints one line per figure with the target next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pty
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lossguard.watch.follow import RunFollower  # noqa: E402
from lossguard.watch.live import LiveRun  # noqa: E402


def make_log(path: Path, records: int, *, seed: int = 0) -> None:
    """A realistic telemetry log: a run record, then one sample per step with a few findings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"v": 1, "t": 0.0, "kind": "run", "max_steps": records * 2}) + "\n")
        lines = []
        for i in range(1, records):
            loss = 2.0 * math.exp(-i / (records / 3)) + 0.5 + 0.05 * rng.random()
            if i % 200_003 == 0:
                loss = 40.0
            lines.append(f'{{"v":1,"t":{1000 + i * 0.25:.3f},"kind":"sample","step":{i},"loss":{loss:.6f},'
                         f'"grad_norm":{1 + rng.random():.5f},"lr":0.0001,"step_time_s":0.25,"tokens":4096}}\n')
            if len(lines) >= 50_000:
                fh.writelines(lines)
                lines = []
        fh.writelines(lines)


def pad_log(path: Path, target_bytes: int) -> None:
    """Grow a log to ``target_bytes`` with ~1 KB sample lines (a note field pads them, so catching up
    a 200 MB file stays quick; the refresh measured afterwards reads only the appended bytes)."""
    note = "x" * 900
    step = 1
    with open(path, "w", encoding="utf-8") as fh:
        size = 0
        while size < target_bytes:
            chunk = "".join(f'{{"v":1,"t":{step + k},"kind":"sample","step":{step + k},"loss":2.0,'
                            f'"grad_norm":1.0,"lr":0.0001,"note":"{note}"}}\n' for k in range(2_000))
            fh.write(chunk)
            size += len(chunk)
            step += 2_000


def bench_once(run_dir: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lossguard", "watch", str(run_dir), "--once", "--json"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    dt = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        print("  --once failed:", r.stderr.strip())
    return dt


def report_once(run_dir: Path, records: int, repeats: int) -> None:
    times = sorted(bench_once(run_dir) for _ in range(repeats))
    print(f"watch --once --json on {records:,} records: best {times[0]:.2f} s, median "
          f"{statistics.median(times):.2f} s of {len(times)} runs  [target < 5 s]")


def bench_refresh(tmp: Path, size_mb: int, appends: int = 30, per_append: int = 20) -> tuple[float, float]:
    """Median seconds of one poll+fold after appending ``per_append`` records, and catch-up time."""
    run = tmp / f"refresh-{size_mb}"
    ev = run / "lossguard" / "events.jsonl"
    ev.parent.mkdir(parents=True, exist_ok=True)
    pad_log(ev, size_mb << 20)
    follower = RunFollower(run)
    t0 = time.perf_counter()
    while follower.poll().behind:  # catch up (not folded: only the refresh is measured)
        pass
    catch_up = time.perf_counter() - t0
    live = LiveRun(run)
    times = []
    step = 10_000_000
    for _ in range(appends):
        with open(ev, "a", encoding="utf-8") as fh:
            for _ in range(per_append):
                step += 1
                fh.write(f'{{"v":1,"t":{step},"kind":"sample","step":{step},"loss":2.0,"grad_norm":1.0}}\n')
        t0 = time.perf_counter()
        live.fold(follower.poll())
        times.append(time.perf_counter() - t0)
    ev.unlink()
    return statistics.median(times), catch_up


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_idle(run_dir: Path, seconds: float) -> float:
    """Share of one core used by `lossguard watch` (dashboard on a pty) while the run is idle."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120", "LINES": "50"}
    proc = subprocess.Popen([sys.executable, "-m", "lossguard", "watch", str(run_dir), "--refresh", "1"],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                if not os.read(master, 65536):
                    break
            except OSError:
                break

    threading.Thread(target=drain, daemon=True).start()
    try:
        time.sleep(5)  # start-up and first read of the log
        c0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = _cpu_seconds(proc.pid), time.monotonic()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        stop.set()
        os.close(master)
    return (c1 - c0) / (t1 - t0)


def bench_report(run_dir: Path, out: Path) -> tuple[float, int, float | None]:
    from lossguard.cli.report import write_report

    t0 = time.perf_counter()
    _, size, _ = write_report(str(run_dir), str(out))
    build = time.perf_counter() - t0
    render = None
    if Path("/usr/bin/chromium").exists():
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                         args=["--headless", "--no-sandbox", "--disable-gpu",
                                               "--disable-background-networking", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            t0 = time.perf_counter()
            page.goto(out.as_uri())
            page.wait_for_selector("body[data-plots-ready]", timeout=60_000)
            render = time.perf_counter() - t0
            browser.close()
    return build, size, render


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    ap.add_argument("--skip-once", action="store_true")
    ap.add_argument("--once-repeats", type=int, default=3, help="--once runs (the machine may be shared)")
    ap.add_argument("--once-only", action="store_true", help="only the --once timing")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        big = tmp / "big"
        t0 = time.perf_counter()
        make_log(big / "lossguard" / "events.jsonl", a.records)
        size = (big / "lossguard" / "events.jsonl").stat().st_size
        print(f"log: {a.records:,} records, {size / 1e6:.0f} MB, written in {time.perf_counter() - t0:.1f} s")

        if a.once_only:
            report_once(big, a.records, a.once_repeats)
            return

        for mb in (10, 200):
            med, catch = bench_refresh(tmp, mb)
            print(f"refresh after appending 20 records to a {mb:>3} MB followed log: {med * 1e3:.2f} ms median "
                  f"(catch-up read of the {mb} MB took {catch:.1f} s)  [target: equal for 10 and 200 MB]")

        idle = bench_idle(big if a.records <= 200_000 else _small_run(tmp), a.idle_seconds)
        print(f"idle CPU of `lossguard watch --refresh 1` (dashboard on a pty) over {a.idle_seconds:.0f} s: "
              f"{idle * 100:.2f}% of a core  [target < 2%]")

        build, rsize, render = bench_report(big, tmp / "report.html")
        print(f"report of {a.records:,} records: built in {build:.1f} s, {rsize / 1e6:.1f} MB [target < 20 MB], "
              f"browser render {'n/a (no chromium)' if render is None else f'{render:.2f} s'} [target < 5 s]")

        if not a.skip_once:
            report_once(big, a.records, a.once_repeats)


def _small_run(tmp: Path) -> Path:
    run = tmp / "idle-run"
    make_log(run / "lossguard" / "events.jsonl", 20_000)
    return run


if __name__ == "__main__":
    main()

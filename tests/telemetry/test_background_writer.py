"""The Trainer callback's writer: the system call on a writer thread, the records unchanged."""

import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest

from lossguard.records import Sample
from lossguard.telemetry import EventWriter

SAMPLES = [
    Sample(step=1, loss=2.3456789012345, grad_norm=0.98765, lr=9.876e-3, epoch=0.25, step_time_s=0.0102, tokens=312),
    Sample(step=2, loss=math.nan, grad_norm=math.inf, lr=-math.inf),
    Sample(step=3, loss=None),
    Sample(step=4, loss=1.0, grad_norm=0.5, lr=1e-3, epoch=0.5, step_time_s=0.01, tokens=3, t=99.5),
]


def _steps(path):
    return [json.loads(line).get("step") for line in path.read_text().splitlines()]


def test_background_writer_writes_the_same_bytes_in_the_same_order(tmp_path):
    fg, bg = tmp_path / "fg.jsonl", tmp_path / "bg.jsonl"
    with EventWriter(fg, clock=lambda: 1700000000.5) as a, EventWriter(bg, clock=lambda: 1700000000.5, background=True) as b:
        for w in (a, b):
            for s in SAMPLES:
                w.write_sample(s)
                w.write("finding", step=s.step, reason="spike", value=math.inf)
    assert bg.read_text() == fg.read_text()
    assert _steps(bg) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert b.written == 8 and b.dropped == 0


def test_background_records_reach_the_file_without_a_flush(tmp_path):
    path = tmp_path / "events.jsonl"
    w = EventWriter(path, background=True)
    w.write_sample(Sample(step=1, loss=1.0))
    deadline = time.monotonic() + 5.0
    while not path.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _steps(path) == [1]  # the writer thread's round, not close(), wrote it
    w.write_sample(Sample(step=2, loss=2.0))
    w.flush()
    assert _steps(path) == [1, 2]
    w.close()
    assert not any(t.name == "lossguard-writer" and t.is_alive() for t in threading.enumerate())


def test_records_of_a_run_that_ends_in_an_exception_are_written_at_exit(tmp_path):
    path = tmp_path / "events.jsonl"
    code = (
        "from lossguard.telemetry import EventWriter\n"
        "from lossguard.records import Sample\n"
        f"w = EventWriter({str(path)!r}, background=True)\n"
        "w.INTERVAL = 3600.0\n"  # only the exit can write them
        "for i in range(1, 501):\n"
        "    w.write_sample(Sample(step=i, loss=1.0 / i))\n"
        "raise SystemExit('training crashed')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "training crashed" in proc.stderr
    assert _steps(path) == list(range(1, 501))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_file_system_that_stops_accepting_writes_does_not_stall_training(tmp_path, caplog):
    """A pipe nobody reads fills up and then blocks every write, as a hung NFS mount does."""
    path = tmp_path / "events.jsonl"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer open it; never read until the end
    try:
        w = EventWriter(path, background=True)
        w.MAX_PENDING = 2_000
        done = threading.Event()

        def train():
            for i in range(1, 20_001):  # far more than the pipe's buffer holds
                w.write_sample(Sample(step=i, loss=float(i), grad_norm=1.0, lr=1e-3, epoch=0.1, step_time_s=0.01,
                                      tokens=8))
            done.set()

        with caplog.at_level("WARNING", logger="lossguard"):
            threading.Thread(target=train, daemon=True).start()
            assert done.wait(30.0), "recording stalled behind a blocked write"
            w.close(timeout=0.2)  # gives up waiting instead of hanging the end of training
        assert w.dropped > 0 and w.written + w.dropped <= 20_000
        assert "dropping new ones" in caplog.text and "did not take the last records" in caplog.text
        # nothing written is lost or torn: what the pipe got is whole lines in step order
        chunks = []
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                chunk = os.read(reader, 1 << 16)
            except BlockingIOError:
                chunk = None
            if chunk:
                chunks.append(chunk)
            elif w._stop.is_set() and not any(t.name == "lossguard-writer" and t.is_alive() for t in threading.enumerate()):
                break
            else:
                time.sleep(0.02)
        lines = b"".join(chunks).decode().splitlines()
        steps = [json.loads(line)["step"] for line in lines]
        assert steps[:1000] == list(range(1, 1001)) and len(steps) == w.written
        assert all(a < b for a, b in zip(steps, steps[1:]))  # in order; the dropped ones are gaps
    finally:
        os.close(reader)


class _Count:
    """A token count read with int(), as the Trainer callback hands it over."""

    def __init__(self, value):
        self.value, self.read_on = value, None

    def __int__(self):
        self.read_on = threading.current_thread().name
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def test_a_token_count_given_apart_is_read_on_the_writer_thread(tmp_path, caplog):
    path, ref = tmp_path / "bg.jsonl", tmp_path / "ref.jsonl"
    good, bad = _Count(312), _Count(RuntimeError("device lost"))
    with caplog.at_level("WARNING", logger="lossguard"):
        with EventWriter(path, clock=lambda: 5.0, background=True) as w:
            w.write_sample(SAMPLES[0], tokens=good)
            w.write_sample(Sample(step=2, loss=math.nan), tokens=bad)  # the general path
    assert good.read_on == "lossguard-writer" and bad.read_on == "lossguard-writer"
    with EventWriter(ref, clock=lambda: 5.0) as r:
        r.write_sample(SAMPLES[0])
        r.write_sample(Sample(step=2, loss=math.nan))
    assert path.read_text() == ref.read_text()  # 312 is SAMPLES[0].tokens; the failed count is left out
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["tokens"] == 312 and "tokens" not in rows[1] and rows[1]["loss"] == "nan"
    assert "token count of step 2 not recorded (device lost)" in caplog.text

import json
import math
import os

import pytest

from lossguard.errors import LogReadError
from lossguard.numbers import as_float
from lossguard.records import Sample
from lossguard.telemetry import EventWriter, LogTail, RunLog, read_events
from lossguard.telemetry.schema import encode
from lossguard.telemetry.writer import set_aside


def test_nonfinite_floats_are_strict_json_and_round_trip(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path, clock=lambda: 100.0) as w:
        w.write_record(Sample(step=1, loss=math.nan, grad_norm=math.inf, lr=1e-3).to_record())
        w.write_record(Sample(step=2, loss=-math.inf, grad_norm=0.5).to_record())
    raw = path.read_text().splitlines()
    for line in raw:  # strict parsers (browsers, jq) reject NaN/Infinity literals
        json.loads(line, parse_constant=lambda c: pytest.fail(f"literal {c} written"))
    first = json.loads(raw[0])
    assert first["v"] == 1 and first["t"] == 100.0 and first["kind"] == "sample"
    assert first["loss"] == "nan" and first["grad_norm"] == "inf"
    samples = [Sample.from_record(r) for r in read_events(path)]
    assert math.isnan(samples[0].loss) and samples[0].grad_norm == math.inf
    assert samples[1].loss == -math.inf and samples[1].grad_norm == 0.5 and samples[1].lr is None


def test_encode_handles_nested_nonfinite_and_numpy():
    import numpy as np

    line = encode({"kind": "x", "a": [1.0, float("nan")], "b": {"c": np.float32(2.5)}, "d": np.float64("inf")})
    assert json.loads(line) == {"kind": "x", "a": [1.0, "nan"], "b": {"c": 2.5}, "d": "inf"}
    assert as_float("-inf") == -math.inf and as_float("nope") is None and as_float(True) is None


def test_reader_tolerates_truncated_last_line_unknown_kinds_and_fields(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"v":1,"kind":"run","max_steps":50,"future_field":{"x":1}}\n'
        '{"v":1,"kind":"sample","step":1,"loss":2.5,"new_metric":7}\n'
        '{"v":2,"kind":"hologram","step":1}\n'
        '{"v":1,"kind":"sample","step":2,"loss":2.4}\n'
        '{"v":1,"kind":"sample","st'
    )
    log = RunLog(source="lossguard", path=path)
    for rec in read_events(path):
        log.add_record(rec)
    assert [s.step for s in log.samples] == [1, 2]
    assert log.samples[0].loss == 2.5 and log.max_steps == 50


def test_reader_rejects_a_file_with_no_record(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\x00\xff\xfe garbage\nmore garbage\n")
    with pytest.raises(LogReadError, match="events.jsonl: not a JSON-lines log"):
        read_events(path)
    with pytest.raises(LogReadError, match="no such file"):
        read_events(tmp_path / "missing.jsonl")
    with pytest.raises(LogReadError, match="is a directory"):
        read_events(tmp_path)


def test_duplicate_steps_keep_the_last(tmp_path):
    log = RunLog(source="x", path=tmp_path)
    log.add_sample(Sample(step=1, loss=3.0))
    log.add_sample(Sample(step=2, loss=2.0))
    log.add_sample(Sample(step=2, loss=1.5))
    log.add_sample(Sample(step=0, loss=9.0))
    assert [(s.step, s.loss) for s in log.samples] == [(0, 9.0), (1, 3.0), (2, 1.5)]
    log.add_sample(Sample(step=1, loss=2.9))
    assert [(s.step, s.loss) for s in log.samples] == [(0, 9.0), (1, 2.9), (2, 1.5)]


def test_tail_follows_growth_holds_partial_lines_and_restarts_on_truncation(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = LogTail(path)
    assert tail.poll() == []  # not there yet
    with open(path, "w") as fh:
        fh.write('{"kind":"sample","step":1,"loss":1.0}\n{"kind":"sample","st')
    assert [r["step"] for r in tail.poll()] == [1]
    with open(path, "a") as fh:
        fh.write('ep":2,"loss":0.9}\n')
    got = tail.poll()
    assert [r["step"] for r in got] == [2] and not tail.reset
    size = path.stat().st_size
    assert tail.offset == size and tail.poll() == []
    path.write_text('{"kind":"sample","step":7,"loss":0.1}\n')  # rewritten shorter
    got = tail.poll()
    assert tail.reset and [r["step"] for r in got] == [7]


def test_tail_restarts_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"kind":"sample","step":1}\n' * 3)
    tail = LogTail(path)
    assert len(tail.poll()) == 3
    os.rename(path, tmp_path / "events.jsonl.1")
    path.write_text('{"kind":"sample","step":1}\n' * 5)  # rotated: a new, longer file
    assert len(tail.poll()) == 5 and tail.reset


def test_writer_on_unwritable_path_warns_and_drops(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level("WARNING", logger="lossguard"):
        w = EventWriter(blocker / "sub" / "events.jsonl")
    assert w.failed and "telemetry disabled" in caplog.text
    w.write("sample", step=1, loss=1.0)  # no exception, nothing written
    assert w.written == 0


def test_write_sample_writes_the_same_line_as_write_record(tmp_path):
    import numpy as np

    samples = [
        Sample(step=7, loss=2.3456789012345, grad_norm=0.98765, lr=9.876e-3, epoch=1.25, step_time_s=0.010234, tokens=312),
        Sample(step=8, loss=math.nan, grad_norm=math.inf, lr=-math.inf, epoch=None, step_time_s=None, tokens=None),
        Sample(step=9, loss=None),
        Sample(step=10, loss=1.0, grad_norm=0.5, lr=1e-3, epoch=0.5, step_time_s=0.01, tokens=3, t=99.5),
        Sample(step=11, loss=np.float64(2.5), grad_norm=np.float32(1.5), tokens=np.int64(3)),
        Sample(step=12, loss=1e300, grad_norm=5e-324, lr=1e-300, epoch=3, step_time_s=0.0, tokens=0),
    ]
    fast, general = tmp_path / "fast.jsonl", tmp_path / "general.jsonl"
    with EventWriter(fast, clock=lambda: 1700000000.12345) as a, EventWriter(general, clock=lambda: 1700000000.12345) as b:
        for s in samples:
            a.write_sample(s)
            b.write_record(s.to_record())
    assert fast.read_text() == general.read_text()
    rows = [json.loads(line) for line in fast.read_text().splitlines()]  # strict: no NaN/Infinity literals
    assert rows[1]["loss"] == "nan" and rows[1]["grad_norm"] == "inf" and rows[1]["lr"] == "-inf"
    assert rows[0] == {"v": 1, "t": 1700000000.123, "kind": "sample", "step": 7, "loss": 2.3456789012345,
                       "grad_norm": 0.98765, "lr": 9.876e-3, "epoch": 1.25, "step_time_s": 0.010234, "tokens": 312}
    assert rows[3]["t"] == 99.5 and rows[4]["loss"] == 2.5 and rows[4]["tokens"] == 3


@pytest.mark.parametrize("background", [False, True])
def test_write_sample_rounds_raw_times_where_it_formats_the_line(tmp_path, background):
    """The callback hands over the raw step time and clock; the line carries t to the millisecond
    and step_time_s to the microsecond, on the fast path and the general (non-finite) one."""
    path = tmp_path / "events.jsonl"
    with EventWriter(path, clock=lambda: 1700000000.1234567, background=background) as w:
        w.write_sample(Sample(step=1, loss=2.0, grad_norm=1.0, lr=1e-3, epoch=0.5, step_time_s=0.0123456789, tokens=5))
        w.write_sample(Sample(step=2, loss=math.nan, step_time_s=0.0123454321))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["t"], r["step_time_s"]) for r in rows] == [(1700000000.123, 0.012346), (1700000000.123, 0.012345)]
    assert rows[1]["loss"] == "nan"


def test_each_record_is_in_the_file_when_the_call_returns(tmp_path):
    path = tmp_path / "events.jsonl"
    w = EventWriter(path, clock=lambda: 1.0)
    for step in range(1, 4):
        w.write_sample(Sample(step=step, loss=float(step)))
        # read through another handle while the writer stays open: nothing waits in a buffer
        assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(1, step + 1))
    w.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_disk_full_mid_run_warns_once_and_turns_the_writer_off(caplog):
    w = EventWriter("/dev/full")
    assert not w.failed
    with caplog.at_level("WARNING", logger="lossguard"):
        w.write_sample(Sample(step=1, loss=1.0))
        w.write("finding", step=1)
    assert w.failed and w.written == 0
    assert caplog.text.count("telemetry disabled") == 1 and "/dev/full" in caplog.text


def test_set_aside_keeps_every_earlier_log_under_its_own_name(tmp_path):
    path = tmp_path / "events.jsonl"
    assert set_aside(path) is None  # nothing there
    path.write_text("")
    assert set_aside(path) is None and path.exists()  # an empty file is no run
    moved = []
    for text in ("first\n", "second\n", "third\n"):
        path.write_text(text)
        os.utime(path, (1_700_000_000, 1_700_000_000))  # the same last-write time: names must still differ
        moved.append(set_aside(path))
    assert not path.exists()
    assert [m.read_text() for m in moved] == ["first\n", "second\n", "third\n"]
    assert len({m.name for m in moved}) == 3
    assert moved[1].name == moved[0].name.replace(".jsonl", "-2.jsonl")


def test_a_log_ending_in_a_partial_line_gets_new_records_on_a_fresh_line(tmp_path, caplog):
    """A run killed mid-write (or a full disk) leaves half a line; the resumed run's first record
    must not be glued to it."""
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        w.write("sample", step=1, loss=2.0)
        w.write("sample", step=2, loss=1.9)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 9])  # the second line cut short, as a kill leaves it
    with caplog.at_level("WARNING", logger="lossguard"), EventWriter(path, background=True) as w:
        w.write("run", start_step=1)
        w.write("sample", step=2, loss=1.8)
    assert "ends in a partial line" in caplog.text
    recs = read_events(path)
    assert [(r["kind"], r.get("step")) for r in recs] == [("sample", 1), ("run", None), ("sample", 2)]
    assert recs[-1]["loss"] == 1.8
    with EventWriter(path) as w:  # a log that ends in a newline is left alone
        w.write("end", step=2)
    assert path.read_bytes().count(b"\n\n") == 0 and read_events(path)[-1]["kind"] == "end"

"""Following a run directory as it grows: only new bytes, truncation, rotation, new checkpoints."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from lossguard.errors import LogReadError
from lossguard.records import Reason
from lossguard.telemetry import EventWriter, reader
from lossguard.telemetry.reader import LogTail
from lossguard.watch.follow import RunFollower, pick_source
from lossguard.watch.live import LiveRun, read_run


def _events(run_dir: Path) -> Path:
    return run_dir / "lossguard" / "events.jsonl"


def _write_samples(run_dir: Path, steps: range, *, loss=lambda i: 2.0, mode: str = "a") -> None:
    p = _events(run_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, mode, encoding="utf-8") as fh:
        for i in steps:
            fh.write(json.dumps({"v": 1, "t": 1000.0 + i, "kind": "sample", "step": i, "loss": loss(i),
                                 "grad_norm": 1.0, "lr": 1e-3}) + "\n")


def _trainer_state(ckpt: Path, last: int, *, loss=lambda i: 2.0, max_steps: int = 100) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    hist = [{"step": i, "loss": loss(i), "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": i / max_steps}
            for i in range(1, last + 1)]
    (ckpt / "trainer_state.json").write_text(json.dumps({"max_steps": max_steps, "num_train_epochs": 1,
                                                         "log_history": hist}))


def test_follows_growth_reading_only_new_bytes(tmp_path: Path) -> None:
    _write_samples(tmp_path, range(1, 11))
    f = RunFollower(tmp_path)
    b = f.poll()
    assert [s.step for s in b.samples] == list(range(1, 11))
    assert b.source is not None and b.source.kind == "lossguard"
    size = _events(tmp_path).stat().st_size
    assert f.progress == (size, size)
    assert f.poll().samples == []
    _write_samples(tmp_path, range(11, 14))
    b = f.poll()
    assert [s.step for s in b.samples] == [11, 12, 13]
    assert not b.reset
    # a half-written line waits for its newline
    with open(_events(tmp_path), "a") as fh:
        fh.write('{"kind":"sample","step":14,"lo')
    assert f.poll().samples == []
    with open(_events(tmp_path), "a") as fh:
        fh.write('ss":1.5}\n')
    assert [(s.step, s.loss) for s in f.poll().samples] == [(14, 1.5)]


def test_truncated_log_starts_over(tmp_path: Path) -> None:
    _write_samples(tmp_path, range(1, 21))
    f = RunFollower(tmp_path)
    assert len(f.poll().samples) == 20
    _write_samples(tmp_path, range(1, 4), mode="w")  # rewritten shorter: a new run in the same dir
    b = f.poll()
    assert b.reset
    assert [s.step for s in b.samples] == [1, 2, 3]
    assert any("truncated or replaced" in n for n in b.notes)


def test_rotated_log_is_waited_for_and_reread(tmp_path: Path) -> None:
    _write_samples(tmp_path, range(1, 6))
    f = RunFollower(tmp_path)
    assert len(f.poll().samples) == 5
    os.rename(_events(tmp_path), tmp_path / "lossguard" / "events.jsonl.1")
    b = f.poll()
    assert b.samples == [] and b.waiting is not None and "gone" in b.waiting
    _write_samples(tmp_path, range(100, 103))
    b = f.poll()
    assert b.reset and [s.step for s in b.samples] == [100, 101, 102]


def test_new_checkpoints_are_picked_up(tmp_path: Path) -> None:
    _trainer_state(tmp_path / "checkpoint-10", 10)
    f = RunFollower(tmp_path)
    b = f.poll()
    assert b.source is not None and b.source.kind == "trainer_state"
    assert [s.step for s in b.samples] == list(range(1, 11)) and b.max_steps == 100
    assert f.poll().samples == []  # unchanged: nothing re-read
    _trainer_state(tmp_path / "checkpoint-20", 20)
    b = f.poll()
    assert [s.step for s in b.samples] == list(range(11, 21))
    assert any("new checkpoint" in n for n in b.notes)
    assert b.source is not None and b.source.path.parent.name == "checkpoint-20"
    # telemetry appearing later wins: the follower switches and starts over
    _write_samples(tmp_path, range(1, 4))
    b = f.poll()
    assert b.reset and b.source is not None and b.source.kind == "lossguard"
    assert [s.step for s in b.samples] == [1, 2, 3]


def test_a_run_that_has_not_started_is_waited_for(tmp_path: Path) -> None:
    f = RunFollower(tmp_path)
    b = f.poll()
    assert b.source is None and b.waiting is not None
    assert b.waiting.startswith(f"waiting for training to start: no log in {tmp_path}")
    _write_samples(tmp_path, range(1, 3))
    b = f.poll()
    assert b.waiting is None and [s.step for s in b.samples] == [1, 2]


def test_missing_directory_and_file_instead_of_directory(tmp_path: Path) -> None:
    with pytest.raises(LogReadError, match="no such directory"):
        RunFollower(tmp_path / "nope")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(LogReadError, match="not a directory"):
        RunFollower(tmp_path / "afile")


def test_binary_garbage_is_skipped_with_bounded_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 1000)
    p = _events(tmp_path)
    p.parent.mkdir(parents=True)
    p.write_bytes(os.urandom(5000).replace(b"\n", b"x") + b"\n" + b"\x00\xff\xfe garbage\n")
    _write_samples(tmp_path, range(1, 3))
    tail = LogTail(p, chunk=700)
    recs: list[dict] = []
    polls = 0
    while True:
        recs += tail.poll()
        polls += 1
        assert len(tail._partial) <= 1000 + 700
        if not tail.behind:
            break
    assert polls > 5  # read in bounded chunks, not in one go
    assert [r["step"] for r in recs] == [1, 2]
    assert tail.bad_lines == 2


def test_garbage_only_log_is_one_clear_error(tmp_path: Path) -> None:
    p = _events(tmp_path)
    p.parent.mkdir(parents=True)
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\n")
    with pytest.raises(LogReadError, match=r"events.jsonl: not a readable log \(\d+ unreadable line"):
        read_run(tmp_path)


def test_corrupt_trainer_state_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_bytes(b'{"log_history": [{"step": 1, "lo')
    with pytest.raises(LogReadError, match="truncated JSON"):
        read_run(tmp_path)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    _trainer_state(tmp_path / "checkpoint-10", 10)
    (tmp_path / "checkpoint-20").mkdir()
    (tmp_path / "checkpoint-20" / "trainer_state.json").write_text('{"log_history": [')
    live = read_run(tmp_path)
    assert live.n_samples == 10
    assert any("checkpoint-10" in n for n in live.notes)


def test_several_runs_in_one_directory_are_named(tmp_path: Path) -> None:
    _write_samples(tmp_path / "run-a", range(1, 3))
    _trainer_state(tmp_path / "run-b" / "checkpoint-5", 5)
    with pytest.raises(LogReadError, match=r"holds 2 runs \(run-a, run-b\); watch one of them"):
        pick_source(tmp_path)
    # both telemetry and a trainer_state: telemetry is used, and the note says so
    _trainer_state(tmp_path / "run-a" / "checkpoint-2", 2)
    src, notes = pick_source(tmp_path / "run-a")
    assert src is not None and src.kind == "lossguard"
    assert notes == ["using lossguard telemetry lossguard/events.jsonl (per-step); ignoring checkpoint-2/trainer_state.json"]
    # two lossguard logs side by side (custom log_subdir): refused, both named
    _write_samples(tmp_path / "run-c", range(1, 3))
    os.rename(tmp_path / "run-c" / "lossguard", tmp_path / "run-c" / "lg1")
    _write_samples(tmp_path / "run-c", range(1, 3))
    os.rename(tmp_path / "run-c" / "lossguard", tmp_path / "run-c" / "lg2")
    with pytest.raises(LogReadError, match=r"several lossguard logs \(lg1/events.jsonl, lg2/events.jsonl\)"):
        pick_source(tmp_path / "run-c")


def test_live_run_runs_the_detectors_on_foreign_logs(tmp_path: Path) -> None:
    _trainer_state(tmp_path / "checkpoint-40", 40, loss=lambda i: math.nan if i == 30 else 2.0)
    live = read_run(tmp_path)
    assert live.n_samples == 40
    assert [(f.reason, f.step) for f in live.findings] == [(Reason.NONFINITE, 30)]
    assert live.status == "critical"


def test_recorded_finding_wins_over_its_replay(tmp_path: Path) -> None:
    with EventWriter(_events(tmp_path)) as w:
        w.write("run", max_steps=50)
        for i in range(1, 21):
            w.write("sample", step=i, loss=math.nan if i == 10 else 2.0, grad_norm=1.0)
        w.write_record({"kind": "finding", "reason": "nonfinite", "severity": "critical", "step": 10,
                        "onset_step": 10, "message": "recorded online"})
    live = read_run(tmp_path)
    assert [(f.reason, f.step, f.message) for f in live.findings] == [(Reason.NONFINITE, 10, "recorded online")]


def test_incremental_findings_are_new_once(tmp_path: Path) -> None:
    _write_samples(tmp_path, range(1, 11))
    f = RunFollower(tmp_path)
    live = LiveRun(tmp_path)
    assert live.fold(f.poll()) == []
    _write_samples(tmp_path, range(11, 13), loss=lambda i: math.inf)
    new = live.fold(f.poll())
    assert [(x.reason, x.step) for x in new] == [(Reason.NONFINITE, 11)]
    assert live.fold(f.poll()) == []
    _write_samples(tmp_path, range(1, 3), mode="w")
    live.fold(f.poll())
    assert live.findings == [] and live.n_samples == 2 and live.resets == 1

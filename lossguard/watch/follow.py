"""Following a run directory's log as training writes it, reading only what is new.

Whatever the run offers is followed: lossguard telemetry (tailed byte by byte), the newest
``checkpoint-*/trainer_state.json`` (re-read only when a newer checkpoint appears or the newest
file changes), LLaMA-Factory's ``trainer_log.jsonl`` (tailed) or a Lightning ``metrics.csv``
(re-read when it changes; Lightning rewrites it). A file that is truncated, rewritten or rotated
away makes the follower start over and say so (``Batch.reset``), and a run that has not started
yet is waited for with a message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lossguard.errors import LogReadError
from lossguard.numbers import as_float
from lossguard.records import Sample, as_step
from lossguard.telemetry.foreign import read_lightning_csv, read_trainer_state
from lossguard.telemetry.reader import READ_CHUNK_BYTES, LogTail
from lossguard.telemetry.runlog import branch_point
from lossguard.telemetry.schema import EVENTS_FILE
from lossguard.telemetry.source import LogSource, _lightning_csvs, check_run_dir, find_source, trainer_states

# Lightning rewrites metrics.csv whole; beyond this size re-reading it per change is refused.
MAX_CSV_BYTES = 512 << 20

LOOKED_FOR = f"lossguard/{EVENTS_FILE}, checkpoint-*/trainer_state.json, trainer_log.jsonl, metrics.csv"
_OWN_FILES = {"alerts.jsonl", "report.html", "watch.log", "watch.pid"}


@dataclass
class Batch:
    """What one poll found: new samples and records, and whether to start over."""

    source: LogSource | None
    samples: list[Sample] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    reset: bool = False
    notes: list[str] = field(default_factory=list)
    waiting: str | None = None
    behind: bool = False
    max_steps: int | None = None
    num_train_epochs: float | None = None
    #: where a ``run`` record (a fresh or resumed run's start) sits among ``samples`` and
    #: ``records``: (samples before it, records before it, the step it started from)
    cuts: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.samples or self.records or self.reset or self.notes)


def _is_run_dir(d: Path, subdir: str) -> bool:
    if (d / subdir / EVENTS_FILE).is_file() or (d / "trainer_log.jsonl").is_file():
        return True
    return bool(trainer_states(d))


def pick_source(run_dir: str | os.PathLike[str], subdir: str = "lossguard") -> tuple[LogSource | None, list[str]]:
    """The log to follow in ``run_dir`` and one-line notes on what else was there.

    Raises:
        LogReadError: the directory is missing or unreadable, or it holds several runs or
            several lossguard logs and no way to tell which one is meant.
    """
    p = check_run_dir(run_dir)
    notes: list[str] = []
    src = find_source(p, subdir)
    try:
        children = sorted(
            (Path(e.path) for e in os.scandir(p) if e.is_dir() and not e.name.startswith(".")), key=str
        )
    except OSError as err:
        raise LogReadError(f"{p}: cannot list directory ({err.strerror or err})") from None
    other_events = [c / EVENTS_FILE for c in children if c.name != subdir and (c / EVENTS_FILE).is_file()]
    if src is not None and src.kind == "lossguard":
        for ev in other_events:
            notes.append(f"also found {ev.relative_to(p)}; using {src.path.relative_to(p)}")
        states = trainer_states(p)
        if states:
            notes.append(
                f"using lossguard telemetry {src.path.relative_to(p)} (per-step); "
                f"ignoring {states[0].relative_to(p)}"
            )
        return src, notes
    if len(other_events) == 1:
        ev = other_events[0]
        notes.append(f"using lossguard telemetry {ev.relative_to(p)}")
        return LogSource("lossguard", ev), notes
    if len(other_events) > 1:
        names = ", ".join(str(e.relative_to(p)) for e in other_events)
        raise LogReadError(f"{p}: holds several lossguard logs ({names}); keep one per run directory")
    if src is None or src.kind == "lightning":
        runs = [c for c in children if _is_run_dir(c, subdir)]
        if len(runs) > 1:
            names = ", ".join(c.name for c in runs[:6]) + (", ..." if len(runs) > 6 else "")
            raise LogReadError(
                f"{p}: holds {len(runs)} runs ({names}); watch one of them, e.g. {runs[0]}"
            )
        if len(runs) == 1 and src is None:
            notes.append(f"using {runs[0]}, the only run inside {p}")
            return pick_source(runs[0], subdir)[0], notes
    if src is not None and src.kind == "trainer_state" and (p / "trainer_log.jsonl").is_file():
        notes.append(f"using {src.path.relative_to(p)}; ignoring trainer_log.jsonl")
    return src, notes


def _llamafactory_sample(entry: dict[str, Any]) -> Sample | None:
    step = as_step(entry.get("current_steps"))
    if step is None or entry.get("loss") is None:
        return None
    return Sample(
        step=step,
        loss=as_float(entry.get("loss")),
        grad_norm=as_float(entry.get("grad_norm")),
        lr=as_float(entry.get("lr", entry.get("learning_rate"))),
        epoch=as_float(entry.get("epoch")),
    )


def _file_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class RunFollower:
    """Polls a run directory and hands out what is new since the last poll.

    Construct it on a directory that exists (``LogReadError`` otherwise); it may hold no log yet.
    With ``wait_for_dir`` (the live dashboard) a directory the Trainer has not created yet is
    waited for too.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, subdir: str = "lossguard",
                 chunk: int = READ_CHUNK_BYTES, reader: Callable[[Path], Any] = read_trainer_state,
                 wait_for_dir: bool = False) -> None:
        self.run_dir = Path(run_dir) if wait_for_dir and not os.path.lexists(run_dir) else check_run_dir(run_dir)
        self.subdir = subdir
        self.source: LogSource | None = None
        self._chunk = chunk
        self._tail: LogTail | None = None
        self._file_key: tuple[int, int, int] | None = None
        self._last_step: int | None = None
        self._last_eval_step: int | None = None
        self._read_state = reader
        self._reported_bad = 0
        self.last_error: LogReadError | None = None

    @property
    def bad_lines(self) -> int:
        return self._tail.bad_lines if self._tail is not None else 0

    @property
    def only_unfinished_line(self) -> bool:
        """The tailed log holds nothing but one line without its newline (cut off, or mid-write)."""
        t = self._tail
        return t is not None and t.good_lines == 0 and t.bad_lines == 0 and t.pending

    @property
    def progress(self) -> tuple[int, int] | None:
        """Bytes read and file size of a tailed log (None for re-read sources)."""
        return (self._tail.offset, self._tail.size) if self._tail is not None else None

    def poll(self) -> Batch:
        """New samples and records since the last poll (see ``Batch``)."""
        if self.source is None and not os.path.lexists(self.run_dir):
            return Batch(None, waiting=f"waiting for training to start: {self.run_dir} does not exist yet")
        if self.source is None or self.source.kind != "lossguard":
            src, notes = pick_source(self.run_dir, self.subdir)
            if src is None and self.source is None:
                return Batch(None, waiting=f"waiting for training to start: no log in {self.run_dir} yet "
                                           f"(looked for {LOOKED_FOR})")
            same = src is None or src == self.source or (
                self.source is not None and src.kind == self.source.kind == "trainer_state")
            if not same:
                assert src is not None
                switched = self.source is not None
                batch = self._start(src, notes)
                if switched:
                    batch.reset = True
                    batch.notes.append(f"switched to {src.path}; starting over")
                return self._extend(batch)
        return self._extend(Batch(self.source))

    def _start(self, src: LogSource, notes: list[str]) -> Batch:
        self.source = src
        self._tail = LogTail(src.path, chunk=self._chunk) if src.kind in ("lossguard", "llamafactory") else None
        self._file_key = None
        self._last_step = self._last_eval_step = None
        self._reported_bad = 0
        if src.kind == "lightning":
            n = len(_lightning_csvs(self.run_dir))
            if n > 1:
                notes.append(f"{n} metrics.csv files found; following the newest")
        return Batch(src, notes=[f"reading {src.path} ({src.kind})", *notes])

    def _extend(self, batch: Batch) -> Batch:
        assert self.source is not None
        kind = self.source.kind
        if kind == "lossguard":
            self._poll_events(batch)
        elif kind == "llamafactory":
            self._poll_llamafactory(batch)
        else:
            self._poll_whole(batch)
        return batch

    def _tail_poll(self, batch: Batch) -> list[dict[str, Any]]:
        assert self._tail is not None
        recs = self._tail.poll()
        if self._tail.reset:
            batch.reset = True
            batch.notes.append(f"{self._tail.path} was truncated or replaced; reading it again from the start")
            self._reported_bad = 0
        if not self._tail.exists() and self._tail._ident is not None and not recs:
            batch.waiting = f"{self._tail.path} is gone (rotated?); waiting for it to come back"
        batch.behind = self._tail.behind
        if self._tail.bad_lines > self._reported_bad and not self._tail.behind:
            batch.notes.append(f"{self._tail.path}: skipped {self._tail.bad_lines} unreadable line(s)")
            self._reported_bad = self._tail.bad_lines
        return recs

    def _poll_events(self, batch: Batch) -> None:
        for rec in self._tail_poll(batch):
            if rec.get("kind") == "sample":
                if rec.get("step") is None:
                    continue
                try:
                    batch.samples.append(Sample.from_record(rec))
                except (TypeError, ValueError):
                    continue
            else:
                start = branch_point(rec)
                if start is not None:
                    batch.cuts.append((len(batch.samples), len(batch.records), start))
                batch.records.append(rec)

    def _poll_llamafactory(self, batch: Batch) -> None:
        for entry in self._tail_poll(batch):
            total = as_step(entry.get("total_steps"))
            if total:
                batch.max_steps = total
            s = _llamafactory_sample(entry)
            if s is not None:
                batch.samples.append(s)
            elif entry.get("eval_loss") is not None and entry.get("current_steps") is not None:
                batch.records.append({"kind": "eval", "step": entry.get("current_steps"),
                                      "eval_loss": entry.get("eval_loss")})

    def _older_state(self, newest: Path) -> Any:
        if self.source is None or self.source.kind != "trainer_state":
            return None
        for p in trainer_states(self.run_dir):
            if p == newest:
                continue
            try:
                return self._read_state(p)
            except LogReadError:
                continue
        return None

    def _poll_whole(self, batch: Batch) -> None:
        assert self.source is not None
        if self.source.kind == "trainer_state":
            states = trainer_states(self.run_dir)
            if not states:
                batch.waiting = f"{self.source.path} is gone; waiting for a checkpoint"
                return
            if states[0] != self.source.path:
                batch.notes.append(f"new checkpoint: reading {states[0]}")
                self.source = LogSource("trainer_state", states[0])
                batch.source = self.source
                self._file_key = None
        path = self.source.path
        key = _file_key(path)
        if key is None or key == self._file_key:
            return
        if self.source.kind == "lightning" and key[2] > MAX_CSV_BYTES:
            raise LogReadError(f"{path}: {key[2] >> 20} MiB is too large to follow (limit {MAX_CSV_BYTES >> 20} MiB)")
        try:
            log = self._read_state(path) if self.source.kind == "trainer_state" else read_lightning_csv(path)
            self.last_error = None
        except LogReadError as err:
            self.last_error = err
            fallback = self._older_state(path) if self._last_step is None else None
            if fallback is None:
                # caught mid-write: the next poll sees the finished file
                batch.notes.append(f"{err}; retrying")
                return
            batch.notes.append(f"{err}; using {fallback.path} until it is readable")
            log = fallback
            key = self._file_key
        self._file_key = key
        batch.max_steps = log.max_steps
        batch.num_train_epochs = log.num_train_epochs
        last = log.samples[-1].step if log.samples else None
        if self._last_step is not None and (last is None or last < self._last_step):
            batch.reset = True
            batch.notes.append(f"{path} now ends at step {last}, before step {self._last_step}; starting over")
            self._last_step = self._last_eval_step = None
        batch.samples = [s for s in log.samples if self._last_step is None or s.step > self._last_step]
        if log.samples:
            self._last_step = log.samples[-1].step
        for ev in log.evals:
            step = as_step(ev.get("step"))
            if step is not None and (self._last_eval_step is None or step > self._last_eval_step):
                batch.records.append(ev)
                self._last_eval_step = step

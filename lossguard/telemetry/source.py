"""Finding and reading the best log in a run directory.

Preference: lossguard telemetry, then the Trainer's newest ``trainer_state.json``, then
LLaMA-Factory's ``trainer_log.jsonl``, then a Lightning ``metrics.csv`` up to three levels down.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

from lossguard.errors import LogReadError
from lossguard.telemetry.foreign import read_lightning_csv, read_llamafactory, read_trainer_state
from lossguard.telemetry.reader import iter_event_batches
from lossguard.telemetry.runlog import RunLog, SampleColumns, branch_point
from lossguard.telemetry.schema import EVENTS_FILE

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class LogSource:
    """Which kind of log a run directory offers, and where."""

    kind: str
    path: Path


def events_path(run_dir: str | os.PathLike[str], subdir: str = "lossguard") -> Path:
    return Path(run_dir) / subdir / EVENTS_FILE


def trainer_states(run_dir: Path) -> list[Path]:
    """``trainer_state.json`` files of a run, newest checkpoint first (top-level one included)."""
    found: list[tuple[int, float, Path]] = []
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return []
    for entry in entries:
        m = _CHECKPOINT.match(entry.name)
        if m and entry.is_dir():
            p = Path(entry.path) / "trainer_state.json"
            if p.is_file():
                found.append((int(m.group(1)), p.stat().st_mtime, p))
    top = run_dir / "trainer_state.json"
    if top.is_file():
        found.append((-1, top.stat().st_mtime, top))
    # the top-level file is written at the end of training: newest by mtime among equals
    found.sort(key=lambda x: (x[0] if x[0] >= 0 else float("inf"), x[1]), reverse=True)
    return [p for _, _, p in found]


def _lightning_csvs(run_dir: Path, depth: int = 3) -> list[Path]:
    out: list[Path] = []

    def walk(d: Path, level: int) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            if e.name == "metrics.csv" and e.is_file():
                out.append(Path(e.path))
            elif level < depth and e.is_dir(follow_symlinks=False) and not e.name.startswith("."):
                walk(Path(e.path), level + 1)

    walk(run_dir, 0)
    out.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return out


def check_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The run directory as a Path, or ``LogReadError`` if it is missing or not a directory."""
    p = Path(run_dir)
    if not p.exists():
        raise LogReadError(f"{p}: no such directory")
    if not p.is_dir():
        raise LogReadError(f"{p}: not a directory (expected a Trainer output_dir)")
    if not os.access(p, os.R_OK | os.X_OK):
        raise LogReadError(f"{p}: permission denied")
    return p


def find_source(run_dir: str | os.PathLike[str], subdir: str = "lossguard") -> LogSource | None:
    """The preferred log of a run directory, or None when it has none (yet)."""
    p = check_run_dir(run_dir)
    ev = events_path(p, subdir)
    if ev.is_file():
        return LogSource("lossguard", ev)
    states = trainer_states(p)
    if states:
        return LogSource("trainer_state", states[0])
    lf = p / "trainer_log.jsonl"
    if lf.is_file():
        return LogSource("llamafactory", lf)
    csvs = _lightning_csvs(p)
    if csvs:
        return LogSource("lightning", csvs[0])
    return None


def read_lossguard_events(path: str | os.PathLike[str], *, columns: bool = False) -> RunLog:
    """A lossguard telemetry log as a ``RunLog``.

    With ``columns`` the samples are kept as arrays in ``log.columns`` (``log.samples`` stays
    empty): what offline analysis of a million-sample log needs, without a million objects.
    """
    log = RunLog(source="lossguard", path=Path(path))
    if not columns:
        for batch in iter_event_batches(path):
            for rec in batch:
                log.add_record(rec)
        return log

    cuts: list[tuple[int, int]] = []  # where a resumed run began: (batches before it, its start step)

    def sample_batches() -> Iterator[list[dict[str, Any]]]:
        yielded = 0
        for batch in iter_event_batches(path):
            kinds = list(map(dict.get, batch, repeat("kind")))
            if kinds.count("sample") == len(batch):
                yield batch
                yielded += 1
                continue
            samples = []
            for rec, kind in zip(batch, kinds):
                if kind == "sample":
                    samples.append(rec)
                    continue
                start = branch_point(rec)
                if start is not None:
                    yield samples
                    yielded += 1
                    samples = []
                    cuts.append((yielded, start))
                log.add_record(rec)
            yield samples
            yielded += 1

    log.columns = SampleColumns.from_record_batches(sample_batches(), cuts)
    return log


def read_source(source: LogSource) -> RunLog:
    if source.kind == "lossguard":
        return read_lossguard_events(source.path)
    if source.kind == "trainer_state":
        return read_trainer_state(source.path)
    if source.kind == "llamafactory":
        return read_llamafactory(source.path)
    if source.kind == "lightning":
        return read_lightning_csv(source.path)
    raise LogReadError(f"{source.path}: unknown log kind {source.kind!r}")


def open_run(run_dir: str | os.PathLike[str], subdir: str = "lossguard", *, columns: bool = False) -> RunLog:
    """Read a run directory's best log.

    ``columns``: read lossguard telemetry samples into ``log.columns`` (arrays) instead of
    ``log.samples`` (see ``read_lossguard_events``); other log kinds are read as usual.

    A corrupt newest ``trainer_state.json`` (say, caught mid-write) falls back to the previous
    checkpoint's; if none is readable, the error names the newest file.

    Raises:
        LogReadError: the directory is missing or holds no log lossguard can read.
    """
    p = check_run_dir(run_dir)
    source = find_source(p, subdir)
    if source is None:
        raise LogReadError(
            f"{p}: no training log found (looked for {subdir}/{EVENTS_FILE}, "
            "checkpoint-*/trainer_state.json, trainer_log.jsonl, metrics.csv)"
        )
    if source.kind == "lossguard" and columns:
        return read_lossguard_events(source.path, columns=True)
    if source.kind != "trainer_state":
        return read_source(source)
    first_error: LogReadError | None = None
    for state in trainer_states(p):
        try:
            return read_trainer_state(state)
        except LogReadError as err:
            first_error = first_error or err
    assert first_error is not None
    raise first_error

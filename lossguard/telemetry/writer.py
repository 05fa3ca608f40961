"""Append-only telemetry writer: one line per record, flushed as it is written.

Each record is one ``os.write`` on a descriptor opened with ``O_APPEND``: no user-space buffer
to flush, so a line is in the file (and visible to ``lossguard watch``) as soon as the call
returns, and the per-step cost is a single system call.

The writer must never hurt training: if the file cannot be opened or written (full disk, a
read-only mount) it logs one warning and turns itself off; records are then dropped, never
raised into the training loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lossguard.records import Sample
from lossguard.telemetry.schema import SCHEMA_VERSION, encode

logger = logging.getLogger("lossguard")


def _json_number(value: Any) -> str | None:
    """``value`` as the strict-JSON text ``encode`` writes (non-finite as a string); None if not a plain number."""
    kind = type(value)
    if kind is float:
        if value - value == 0.0:  # finite
            return float.__repr__(value)
        return '"nan"' if value != value else ('"inf"' if value > 0 else '"-inf"')
    if kind is int:
        return int.__repr__(value)
    return "null" if value is None else None


def set_aside(path: str | os.PathLike[str]) -> Path | None:
    """Move an earlier run's non-empty log out of the way of a fresh run; where it went, or None.

    A run that starts at step 0 in an output_dir that already has ``events.jsonl`` would
    otherwise append to it, and the report would mix both runs' findings. The old log is kept,
    renamed ``events.<time it was last written>.jsonl`` (never overwritten, never deleted). A
    failure (a read-only directory) logs a warning and leaves the file where it is.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_size == 0:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(st.st_mtime))
    target = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    n = 2
    while target.exists():
        target = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
        n += 1
    try:
        os.replace(path, target)
    except OSError as err:
        logger.warning("lossguard: %s holds an earlier run and could not be moved aside (%s); appending to it",
                       path, err.strerror or err)
        return None
    logger.warning("lossguard: %s held an earlier run; kept it as %s", path, target.name)
    return target


class EventWriter:
    """Appends records to ``path``; safe to call from several threads."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.failed = False
        self.written = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as err:
            self._fail(f"cannot open {self.path} for appending ({err.strerror or err})")

    def _fail(self, why: str) -> None:
        self.failed = True
        logger.warning("lossguard: telemetry disabled: %s; training continues", why)

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one record of ``kind``; returns the record as written (with ``v`` and ``t``)."""
        record: dict[str, Any] = {"v": SCHEMA_VERSION, "t": round(self._clock(), 3), "kind": kind}
        record.update(fields)
        self.write_record(record)
        return record

    def write_record(self, record: dict[str, Any]) -> None:
        """Append ``record`` (a dict with ``kind``), adding ``v`` and ``t`` when missing."""
        record = {"v": record.get("v", SCHEMA_VERSION), "t": record.get("t", round(self._clock(), 3)), **record}
        if self._fd is None:
            return
        try:
            line = encode(record) + "\n"
        except (TypeError, ValueError) as err:
            logger.warning("lossguard: dropped an unserialisable %s record (%s)", record.get("kind"), err)
            return
        self._append(line)

    def write_sample(self, sample: Sample) -> None:
        """Append ``sample`` exactly as ``write_record(sample.to_record())`` would, for a third of the cost.

        This runs after every optimizer step, so the line is formatted directly instead of
        through a dict and ``json``; a field of any other type than int/float/None takes the
        general path.
        """
        if self._fd is None:
            return
        t = sample.t if sample.t is not None else round(self._clock(), 3)
        step, loss, grad_norm, lr = sample.step, sample.loss, sample.grad_norm, sample.lr
        epoch, seconds, tokens = sample.epoch, sample.step_time_s, sample.tokens
        if (type(loss) is float and type(grad_norm) is float and type(lr) is float and type(epoch) is float
                and type(seconds) is float and type(tokens) is int and type(step) is int and type(t) is float
                and loss - loss == 0.0 and grad_norm - grad_norm == 0.0 and lr - lr == 0.0
                and epoch - epoch == 0.0 and seconds - seconds == 0.0 and t - t == 0.0):
            # the usual step: every field present and finite
            self._append(f'{{"v":{SCHEMA_VERSION},"t":{t!r},"kind":"sample","step":{step},"loss":{loss!r},'
                         f'"grad_norm":{grad_norm!r},"lr":{lr!r},"epoch":{epoch!r},"step_time_s":{seconds!r},'
                         f'"tokens":{tokens}}}\n')
            return
        head = _json_number(t), _json_number(step), _json_number(loss)
        if None in head:
            self.write_record(sample.to_record())
            return
        parts = [f'{{"v":{SCHEMA_VERSION},"t":{head[0]},"kind":"sample","step":{head[1]},"loss":{head[2]}']
        for key, value in ((',"grad_norm":', grad_norm), (',"lr":', lr), (',"epoch":', epoch),
                           (',"step_time_s":', seconds), (',"tokens":', tokens)):
            if value is not None:
                text = _json_number(value)
                if text is None:
                    self.write_record(sample.to_record())
                    return
                parts.append(key)
                parts.append(text)
        parts.append("}\n")
        self._append("".join(parts))

    def _append(self, line: str) -> None:
        data = memoryview(line.encode("utf-8"))
        with self._lock:
            if self._fd is None:
                return
            try:
                while data:
                    data = data[os.write(self._fd, data):]
                self.written += 1
            except OSError as err:
                self._close_quietly()
                self._fail(f"cannot write {self.path} ({err.strerror or err})")

    def _close_quietly(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

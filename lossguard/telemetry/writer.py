"""Append-only telemetry writer: one line per record, flushed as it is written.

Each record is one ``os.write`` on a descriptor opened with ``O_APPEND``: no user-space buffer
to flush, so a line is in the file (and visible to ``lossguard watch``) as soon as the call
returns.

With ``background=True`` (the Trainer callback) the system call happens on a writer thread: the
training thread only queues the record, so a slow or hanging file system (NFS, a full disk
retrying) never stalls a training step. The thread wakes every ``INTERVAL`` seconds (50 ms) and
writes what has been queued, in order, in one call: a record is in the file at most that long
after it was recorded. It does not wake per record: waking a thread costs the training thread
as much as the write itself (the thread then competes for the GIL). ``flush()`` writes what is
queued at once, ``close()`` too, and so does the interpreter's exit when a run ends in an
exception.

The writer must never hurt training: if the file cannot be opened or written (full disk, a
read-only mount) it logs one warning and turns itself off; records are then dropped, never
raised into the training loop.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, SupportsInt

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
    """Appends records to ``path``; safe to call from several threads.

    Args:
        path: the log file (created with its folder when missing).
        clock: the source of the ``t`` field.
        background: do the writing on a writer thread (see the module's docstring).
    """

    #: records a background writer holds before it drops new ones (a file system that has
    #: stopped accepting writes must not grow the training process without bound)
    MAX_PENDING = 100_000
    #: seconds between the background writer's rounds
    INTERVAL = 0.05

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time,
                 background: bool = False):
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.failed = False
        self.error: OSError | None = None  # what the file system answered when it refused a write
        self.written = 0
        self.dropped = 0
        self._queued = 0  # records given to the writer thread
        self._taken = 0  # ... and taken off its queue
        self._backlog_warned = False
        self._queue: deque[Any] | None = None
        self._drain_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as err:
            self.error = err
            self._fail(f"cannot open {self.path} for appending ({err.strerror or err})")
        if self._fd is not None and not self._ends_a_line():
            # a run killed mid-write (or a full disk) left half a line: glued to it, our first
            # record would be unreadable too
            logger.warning("lossguard: %s ends in a partial line (an interrupted write); it is left "
                           "as it is and the new records start on a fresh line", self.path)
            self._append("\n", 0)
        if background and self._fd is not None:
            self._queue = deque()
            self._thread = threading.Thread(target=self._drain, name="lossguard-writer", daemon=True)
            self._thread.start()
            atexit.register(self.close)

    def _ends_a_line(self) -> bool:
        """Whether the file is empty or its last byte is a newline."""
        assert self._fd is not None
        try:
            size = os.fstat(self._fd).st_size
            if size == 0:
                return True
            with open(self.path, "rb") as fh:
                fh.seek(size - 1)
                return fh.read(1) == b"\n"
        except OSError:
            return True  # nothing can be done about it here; the write will say if the file is unusable

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
        if self._queue is not None:
            self._put(line)
        else:
            self._append(line)

    def write_sample(self, sample: Sample, *, tokens: SupportsInt | None = None) -> None:
        """Append ``sample`` as ``write_record(sample.to_record())`` would, for a third of the cost,
        with its times rounded: ``t`` to the millisecond, ``step_time_s`` to the microsecond.

        This runs after every optimizer step: a background writer formats the line on its own
        thread (the sample is not changed after it is recorded), and the line is formatted
        directly instead of through a dict and ``json``. The rounding happens there too: a
        float's ``round`` goes through a decimal conversion, slow on the training thread right
        after a step has filled the caches. ``tokens``, when given, replaces ``sample.tokens`` and is read with
        ``int()`` where the line is formatted (the Trainer callback's token count is summed
        there, off the training thread).
        """
        if self._fd is None:
            return
        t = sample.t if sample.t is not None else self._clock()
        if self._queue is not None:
            self._put((sample, t, tokens))
        else:
            self._append(self._sample_line(sample, t, tokens))

    def _sample_line(self, sample: Sample, t: Any, counted: SupportsInt | None = None) -> str:
        """The line of ``sample`` stamped ``t``; a field of any other type than int/float/None
        takes the general path."""
        step, loss, grad_norm, lr = sample.step, sample.loss, sample.grad_norm, sample.lr
        epoch, seconds, tokens = sample.epoch, sample.step_time_s, sample.tokens
        if type(t) is float:
            t = round(t, 3)
        if type(seconds) is float:
            seconds = round(seconds, 6)
        if counted is not None:
            try:
                tokens = int(counted)
            except Exception as err:  # a token count that cannot be read costs the field, not the record
                logger.warning("lossguard: token count of step %s not recorded (%s)", step, err)
                tokens = None
        if (type(loss) is float and type(grad_norm) is float and type(lr) is float and type(epoch) is float
                and type(seconds) is float and type(tokens) is int and type(step) is int and type(t) is float
                and loss - loss == 0.0 and grad_norm - grad_norm == 0.0 and lr - lr == 0.0
                and epoch - epoch == 0.0 and seconds - seconds == 0.0 and t - t == 0.0):
            # the usual step: every field present and finite
            return (f'{{"v":{SCHEMA_VERSION},"t":{t!r},"kind":"sample","step":{step},"loss":{loss!r},'
                    f'"grad_norm":{grad_norm!r},"lr":{lr!r},"epoch":{epoch!r},"step_time_s":{seconds!r},'
                    f'"tokens":{tokens}}}\n')
        head = _json_number(t), _json_number(step), _json_number(loss)
        if None in head:
            return self._general_line(sample, t, tokens, seconds)
        parts = [f'{{"v":{SCHEMA_VERSION},"t":{head[0]},"kind":"sample","step":{head[1]},"loss":{head[2]}']
        for key, value in ((',"grad_norm":', grad_norm), (',"lr":', lr), (',"epoch":', epoch),
                           (',"step_time_s":', seconds), (',"tokens":', tokens)):
            if value is not None:
                text = _json_number(value)
                if text is None:
                    return self._general_line(sample, t, tokens, seconds)
                parts.append(key)
                parts.append(text)
        parts.append("}\n")
        return "".join(parts)

    @staticmethod
    def _general_line(sample: Sample, t: Any, tokens: Any, seconds: Any) -> str:
        record = {"v": SCHEMA_VERSION, "t": t, **sample.to_record()}
        if seconds is not None:
            record["step_time_s"] = seconds
        record.pop("tokens", None)
        if tokens is not None:
            record["tokens"] = tokens
        return encode(record) + "\n"

    # --- the background writer ----------------------------------------------------------------
    def _put(self, item: Any) -> None:
        assert self._queue is not None
        if self._queued - self._taken >= self.MAX_PENDING:
            self.dropped += 1
            if not self._backlog_warned:
                self._backlog_warned = True
                logger.warning("lossguard: %s has not accepted a write for %d records; dropping new ones "
                               "until it does; training continues", self.path, self.MAX_PENDING)
            return
        self._queued += 1
        self._queue.append(item)

    def _drain(self) -> None:
        """The writer thread: every ``INTERVAL`` seconds, what has been queued."""
        try:
            while not self._stop.wait(self.INTERVAL):
                self._write_queued()
            self._write_queued()
        except Exception as err:  # never let the thread die with a traceback into the user's console
            self._close_quietly()
            self._fail(f"the writer thread failed ({type(err).__name__}: {err})")
        with self._lock:  # close() may have given up waiting for this last round
            self._close_quietly()

    def _write_queued(self) -> None:
        q = self._queue
        if q is None:
            return
        with self._drain_lock:  # the writer thread and a flush() never interleave their records
            lines: list[str] = []
            while True:
                try:
                    item = q.popleft()
                except IndexError:
                    break
                self._taken += 1
                try:
                    lines.append(item if type(item) is str else self._sample_line(*item))
                except Exception as err:  # never raised into training, never stops the thread
                    self.dropped += 1
                    logger.warning("lossguard: dropped a record that could not be formatted (%s)", err)
            if lines:
                self._append("".join(lines), len(lines))

    def flush(self) -> None:
        """Write every record queued so far, now, on the calling thread."""
        self._write_queued()

    def _append(self, line: str, records: int = 1) -> None:
        data = memoryview(line.encode("utf-8"))
        with self._lock:
            if self._fd is None:
                return
            try:
                while data:
                    data = data[os.write(self._fd, data):]
                self.written += records
            except OSError as err:
                self._close_quietly()
                self.error = err
                self._fail(f"cannot write {self.path} ({err.strerror or err})")

    def _close_quietly(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (waiting up to ``timeout`` seconds for the file system), then close."""
        thread, self._thread = self._thread, None
        if thread is not None:
            atexit.unregister(self.close)
            self._stop.set()
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("lossguard: %s did not take the last records within %.1f s (%d still queued); "
                               "left to the writer thread", self.path, timeout, self._queued - self._taken)
                return
        with self._lock:
            self._close_quietly()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

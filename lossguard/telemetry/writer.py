"""Append-only telemetry writer: one line per record, flushed as it is written.

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
from typing import IO, Any

from lossguard.telemetry.schema import SCHEMA_VERSION, encode

logger = logging.getLogger("lossguard")


class EventWriter:
    """Appends records to ``path``; safe to call from several threads."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None
        self.failed = False
        self.written = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
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
        if self._fh is None:
            return
        try:
            line = encode(record) + "\n"
        except (TypeError, ValueError) as err:
            logger.warning("lossguard: dropped an unserialisable %s record (%s)", record.get("kind"), err)
            return
        with self._lock:
            if self._fh is None:
                return
            try:
                self._fh.write(line)
                self._fh.flush()
                self.written += 1
            except OSError as err:
                self._close_quietly()
                self._fail(f"cannot write {self.path} ({err.strerror or err})")

    def _close_quietly(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

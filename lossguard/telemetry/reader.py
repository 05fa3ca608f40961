"""Reading the telemetry log: whole files, or following one as it grows.

Readers are forgiving where a live log is legitimately imperfect (a last line still being
written, record kinds or fields from a newer lossguard) and precise where it is not: a file that
holds no readable record at all raises ``LogReadError`` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lossguard.errors import LogReadError


def _open_error(path: Path, err: OSError) -> LogReadError:
    if isinstance(err, FileNotFoundError):
        return LogReadError(f"{path}: no such file")
    if isinstance(err, PermissionError):
        return LogReadError(f"{path}: permission denied")
    if isinstance(err, IsADirectoryError):
        return LogReadError(f"{path}: is a directory, expected a log file")
    return LogReadError(f"{path}: cannot read ({err.strerror or err})")


def parse_line(line: bytes | str) -> dict[str, Any] | None:
    """One JSONL line as a dict, or None when it is blank, garbage or not an object."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def iter_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every readable record of a JSONL file, in order.

    Unparseable lines (a truncated last line, garbage) are skipped; if the file has content but
    not one readable record, ``LogReadError`` says so.
    """
    p = Path(path)
    try:
        fh = open(p, "rb")
    except OSError as err:
        raise _open_error(p, err) from None
    good = bad = 0
    with fh:
        for raw in fh:
            if not raw.strip():
                continue
            rec = parse_line(raw)
            if rec is None:
                bad += 1
                continue
            good += 1
            yield rec
    if good == 0 and bad > 0:
        raise LogReadError(f"{p}: not a JSON-lines log ({bad} unreadable line(s), no record)")


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All readable records of a JSONL file (see ``iter_events``), read in batches.

    Same records, same skipped lines and same errors as ``iter_events``, several times faster
    (see ``iter_event_batches``).
    """
    out: list[dict[str, Any]] = []
    for batch in iter_event_batches(path):
        out.extend(batch)
    return out


# Bytes of whole lines parsed per call: small enough to stay in the CPU cache (a 4 MB batch
# parses ~2x slower per byte than a 256 KB one) and to free each batch's dicts early.
BATCH_BYTES = 256 << 10
_READ_BLOCK = 8 << 20


def iter_event_batches(path: str | os.PathLike[str], *, batch_bytes: int = BATCH_BYTES) -> Iterator[list[dict[str, Any]]]:
    """The readable records of a JSONL file in file order, as lists of up to ``batch_bytes`` of lines.

    Exactly the records ``iter_events`` yields: each batch is parsed in one call as a JSON array
    when every line in it is one object; a batch with a blank, truncated or corrupt line is
    parsed line by line and its unreadable lines skipped. If the file has content but not one
    readable record, ``LogReadError`` says so (after the last batch).
    """
    p = Path(path)
    try:
        fh = open(p, "rb")
    except OSError as err:
        raise _open_error(p, err) from None
    good = bad = 0
    with fh:
        rest = b""
        while True:
            try:
                block = fh.read(_READ_BLOCK)
            except OSError as err:
                raise _open_error(p, err) from None
            if not block:
                break
            buf = rest + block if rest else block
            cut = buf.rfind(b"\n") + 1
            rest = buf[cut:]
            pos = 0
            while pos < cut:
                end = buf.rfind(b"\n", pos, pos + batch_bytes) + 1
                if end <= pos:  # one line longer than a batch
                    end = buf.find(b"\n", pos) + 1
                recs, nbad = _parse_batch(buf[pos:end])
                pos = end
                good += len(recs)
                bad += nbad
                if recs:
                    yield recs
        if rest:
            recs, nbad = _parse_batch(rest)
            good += len(recs)
            bad += nbad
            if recs:
                yield recs
    if good == 0 and bad > 0:
        raise LogReadError(f"{p}: not a JSON-lines log ({bad} unreadable line(s), no record)")


def _parse_batch(chunk: bytes) -> tuple[list[dict[str, Any]], int]:
    """Records of whole lines (each ending in a newline, but for a file's last), and the count of bad ones."""
    body = chunk[:-1] if chunk.endswith(b"\n") else chunk
    doc = _as_array(body)
    if doc is not None:
        n, array = doc
        try:
            recs = _loads(memoryview(array))
        except (ValueError, UnicodeDecodeError):
            recs = None
        if type(recs) is list and len(recs) == n and set(map(type, recs)) == {dict}:
            return recs, 0
    out: list[dict[str, Any]] = []
    bad = 0
    for raw in body.split(b"\n"):
        if not raw.strip():
            continue
        rec = parse_line(raw)
        if rec is None:
            bad += 1
        else:
            out.append(rec)
    return out, bad


def _as_array(body: bytes) -> tuple[int, Any] | None:
    """``body``'s lines as one JSON array ("[", lines joined by ",", "]") with its line count,
    or None unless every line break sits between a "}" and a "{" (so the array's elements are
    exactly the lines: no blank line, nothing before or after an object)."""
    if not (body.startswith(b"{") and body.rstrip(b"\r").endswith(b"}")):
        return None
    a = np.frombuffer(body, dtype=np.uint8)
    nl = np.flatnonzero(a == 10)
    if len(nl):
        before = a[nl - 1]
        cr = before == 13  # "\r\n" line ends; "\r" is JSON whitespace
        if not (a[nl + 1] == 123).all():
            return None
        if cr.any():
            if not ((before[~cr] == 125).all() and (a[nl[cr] - 2] == 125).all()):
                return None
        elif not (before == 125).all():
            return None
    buf = np.empty(len(body) + 2, dtype=np.uint8)
    buf[0] = 91
    buf[1:-1] = a
    buf[1 + nl] = 44
    buf[-1] = 93
    return len(nl) + 1, buf


def _loads(data: memoryview) -> Any:
    try:
        import orjson
    except ImportError:
        return json.loads(bytes(data))
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # orjson is stricter (NaN literals, huge ints): let json decide
        return json.loads(bytes(data))


# A log line longer than this is not telemetry (binary garbage, a runaway write): it is skipped
# rather than held in memory waiting for a newline that may never come.
MAX_LINE_BYTES = 1 << 20
# Bytes read per poll: a multi-GB log is caught up in bounded steps, never slurped whole.
READ_CHUNK_BYTES = 16 << 20

class LogTail:
    """Follows one growing JSON-lines file, reading only the bytes added since the last poll.

    Unlike a plain ``readline`` loop it never holds more than ``MAX_LINE_BYTES`` of an unfinished
    line, reads at most ``chunk`` bytes per poll (``behind`` says more is waiting), counts lines it
    could not read (``bad_lines``) and notices truncation, rewriting and rotation (``reset``).
    """

    def __init__(self, path: str | os.PathLike[str], *, chunk: int = READ_CHUNK_BYTES) -> None:
        self.path = Path(path)
        self.offset = 0
        self.size = 0
        self.reset = False
        self.behind = False
        self.bad_lines = 0
        self.good_lines = 0
        self._ident: tuple[int, int] | None = None
        self._partial = b""
        self._skipping = False
        self._chunk = chunk

    def exists(self) -> bool:
        return self.path.is_file()

    @property
    def pending(self) -> bool:
        """Whether an unfinished last line (no newline yet) is held back."""
        return bool(self._partial.strip()) or self._skipping

    def poll(self) -> list[dict[str, Any]]:
        """Records completed since the previous poll; [] when the file is absent or unchanged."""
        self.reset = False
        try:
            st = self.path.stat()
        except OSError:
            return []
        ident = (st.st_dev, st.st_ino)
        if self._ident is not None and (ident != self._ident or st.st_size < self.offset):
            self.offset = 0
            self._partial = b""
            self._skipping = False
            self.bad_lines = self.good_lines = 0
            self.reset = True
        self._ident = ident
        self.size = st.st_size
        if st.st_size == self.offset:
            self.behind = False
            return []
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read(self._chunk)
        except OSError:
            return []
        self.offset += len(chunk)
        self.behind = self.offset < st.st_size
        return self._lines(chunk)

    def _lines(self, chunk: bytes) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                raw = self._partial + chunk[start:nl] if self._partial else chunk[start:nl]
                if raw.strip():
                    rec = parse_line(raw)
                    if rec is None:
                        self.bad_lines += 1
                    else:
                        self.good_lines += 1
                        out.append(rec)
            self._partial = b""
            start = nl + 1
        if not self._skipping:
            self._partial += chunk[start:]
            if len(self._partial) > MAX_LINE_BYTES:
                self._partial = b""
                self._skipping = True
                self.bad_lines += 1
        return out

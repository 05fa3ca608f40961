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
    """All readable records of a JSONL file (see ``iter_events``).

    The whole file is parsed in one call when every line is a JSON object (the usual case:
    several times faster than line by line); otherwise the lines are parsed one at a time and
    the unreadable ones skipped, as ``iter_events`` does.
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise _open_error(p, err) from None
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    if not lines:
        return []
    try:
        recs = _loads(b"[" + b",".join(lines) + b"]")
        if len(recs) == len(lines) and all(type(r) is dict for r in recs):
            return recs
    except (ValueError, UnicodeDecodeError):
        pass
    out = [r for r in map(parse_line, lines) if r is not None]
    if not out:
        raise LogReadError(f"{p}: not a JSON-lines log ({len(lines)} unreadable line(s), no record)")
    return out


def _loads(data: bytes) -> Any:
    try:
        import orjson
    except ImportError:
        return json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # orjson is stricter (NaN literals, huge ints): let json decide
        return json.loads(data)


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

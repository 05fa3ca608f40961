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


class LogTail:
    """Follows a growing JSONL file, reading only the bytes added since the last poll.

    A partial last line is held back until its newline arrives. If the file shrinks or is
    replaced (truncated, rewritten, rotated), the tail starts again from the beginning and
    ``reset`` is set for that poll so the caller can drop what it derived from the old content.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_read_bytes: int = 64 * 1024 * 1024):
        self.path = Path(path)
        self.offset = 0
        self.reset = False
        self._inode: tuple[int, int] | None = None
        self._partial = b""
        self._max_read = max_read_bytes

    def poll(self) -> list[dict[str, Any]]:
        """Records completed since the previous poll; [] when the file is absent or unchanged."""
        self.reset = False
        try:
            st = self.path.stat()
        except OSError:
            return []
        ident = (st.st_dev, st.st_ino)
        if self._inode is not None and (ident != self._inode or st.st_size < self.offset):
            self.offset = 0
            self._partial = b""
            self.reset = True
        self._inode = ident
        if st.st_size == self.offset:
            return []
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read(self._max_read)
        except OSError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out = []
        for raw in lines:
            if raw.strip():
                rec = parse_line(raw)
                if rec is not None:
                    out.append(rec)
        return out

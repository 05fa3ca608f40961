"""Which alerts the watch daemon has already sent, per log, so that none is sent twice."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lossguard.records import Finding
from lossguard.telemetry.reader import parse_line


class AlertBook:
    """Alerts sent, by (reason, step), per log identity.

    A log's identity is the time of its first ``run`` record: a fresh run that replaced the log
    (moved aside, truncated, rewritten) is another run, and its findings alert again even at the
    same (reason, step); a resumed run appends to the same log and keeps its identity. Alerts
    written before identities were recorded count for every log.
    """

    def __init__(self, sent: dict[str | None, set[tuple[str, int]]] | None = None) -> None:
        self.sent = sent if sent is not None else {}
        self.log_id: str | None = None
        self._known = set(self.sent.get(None, ()))

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> AlertBook:
        """The alerts already in ``alerts.jsonl`` (a restarted daemon does not repeat them)."""
        sent: dict[str | None, set[tuple[str, int]]] = {}
        try:
            with open(Path(path), "rb") as fh:
                for raw in fh:
                    rec = parse_line(raw)
                    if rec and isinstance(rec.get("step"), int):
                        log_id = rec.get("log_id")
                        sent.setdefault(None if log_id is None else str(log_id), set()).add(
                            (str(rec.get("reason")), rec["step"]))
        except OSError:
            pass
        return cls(sent)

    def follow(self, batch: Any) -> None:
        """Take in one poll of the follower (a ``watch.follow.Batch``): a reset forgets the log's
        identity, its first ``run`` record gives it one."""
        if batch.reset:
            self.log_id, self._known = None, set(self.sent.get(None, ()))
        if self.log_id is None:
            first = next((r for r in batch.records if r.get("kind") == "run" and r.get("t") is not None), None)
            if first is not None:
                self.log_id = str(first["t"])
                self._known = self.sent.get(self.log_id, set()) | self.sent.get(None, set())

    def first_time(self, f: Finding) -> bool:
        """Whether ``f`` has not alerted yet for this log (it is then counted as sent)."""
        key = (f.reason.value, f.step)
        if key in self._known:
            return False
        self._known.add(key)
        return True

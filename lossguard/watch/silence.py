"""When a watched run has gone quiet: no new record for a while, and no ``end`` record."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lossguard.telemetry.schema import SCHEMA_VERSION

#: seconds without a new record before the daemon says training stopped writing: at least this,
#: and at least STALL_STEPS times the run's recent seconds per step
STALL_AFTER_S = 300.0
STALL_STEPS = 20


class Silence:
    """Notices when a run that has not ended stops writing to its log, once per silence."""

    def __init__(self) -> None:
        self.last_heard: float | None = None
        self.said = False

    def heard(self, now: float, say: Callable[[str], None]) -> None:
        if self.said and self.last_heard is not None:
            say(f"the log is written again after {now - self.last_heard:.0f} s of silence")
        self.last_heard, self.said = now, False

    def check(self, now: float, live: Any, stall_after: float | None) -> str | None:
        """The notice to give now, if the silence has just become long enough."""
        if self.said or self.last_heard is None or live.ended or live.last is None:
            return None
        limit = stall_after
        if limit is None:
            per = live.seconds_per_step()
            limit = max(STALL_AFTER_S, STALL_STEPS * per) if per is not None else STALL_AFTER_S
        quiet = now - self.last_heard
        if quiet < limit:
            return None
        self.said = True
        return (f"no record for {quiet:.0f} s since step {live.last.step} and the run has not ended: "
                f"training may have stopped, hung or crashed")


def stalled_alert(message: str, now: float, live: Any, run_dir: Any, log_id: str | None) -> dict[str, Any]:
    """The ``alerts.jsonl`` record of a silence (reason ``stalled``, at the last step logged)."""
    return {"v": SCHEMA_VERSION, "t": round(now, 3), "kind": "alert", "reason": "stalled", "severity": "warning",
            "step": live.last.step if live.last is not None else None, "message": message,
            "run_dir": str(run_dir), "log_id": log_id}

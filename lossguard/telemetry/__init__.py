"""The log file: the only link between the trainer and the watcher."""

from lossguard.telemetry.reader import LogTail, iter_events, read_events
from lossguard.telemetry.runlog import RunLog
from lossguard.telemetry.schema import EVENTS_FILE, SCHEMA_VERSION, encode
from lossguard.telemetry.source import LogSource, find_source, open_run
from lossguard.telemetry.writer import EventWriter

__all__ = [
    "EVENTS_FILE",
    "SCHEMA_VERSION",
    "EventWriter",
    "LogSource",
    "LogTail",
    "RunLog",
    "encode",
    "find_source",
    "iter_events",
    "open_run",
    "read_events",
]

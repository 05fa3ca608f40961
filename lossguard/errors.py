"""Errors meant for the person at the keyboard: one line that names the file and the problem."""

from __future__ import annotations


class LossguardError(Exception):
    """A user-facing failure. The CLI prints ``str(err)`` as one line, without a traceback."""


class LogReadError(LossguardError):
    """A log file or run directory could not be read or understood."""

"""Watching a run from outside the trainer: follow its log, run the detectors, alert, report.

``follow`` reads whichever log a run directory offers as it grows (only the new bytes),
``live`` folds what arrives into a bounded summary and runs the same detectors as the callback,
``daemon`` does both in the background with alerts, a pidfile and a periodic HTML report.
"""

"""Watching a run from outside the trainer: follow its log and run the detectors over it.

``follow`` reads whichever log a run directory offers as it grows (only the new bytes),
``live`` folds what arrives into a bounded summary and runs the same detectors as the callback,
``downsample`` thins a long curve in bounded memory and keeps its spikes. The views in
``presentation`` and the commands in ``cli`` (the dashboard, the report, the background daemon
of ``cli/watch_daemon.py``) read this package; nothing here imports them.
"""
